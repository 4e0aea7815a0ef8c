"""Regularized SGD (SPEC 2.6) and the plain step it is compared with.

    L = (1/B) Σ_i ℓ_i + γ_a (1/B) Σ_i ‖a_i‖² + γ_V ‖V‖_F²

with ``a_i`` the input of the final linear layer (or of any named layers, summed) and ``V`` its
weight: the two quantities J-SAM keeps small in a two-layer linear network (SPEC 2.5), at the
cost of one forward and one backward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..hooks import capture_inputs
from ..jacobian import check_inputs, check_loss, model_logits
from ..logit_terms import check_head, per_example_loss
from ..norms import find_head, resolve_layers

__all__ = ["SGDStep", "RegularizedSGD"]


class SGDStep:
    """One forward, one backward, one base-optimizer step: ``step(inputs, targets) -> loss``.

    The plain baseline with the same interface as :class:`~sam_diagnostics.optim.SAM`.

    Examples
    --------
    >>> net = nn.Linear(4, 3)
    >>> opt = SGDStep(net, torch.optim.SGD(net.parameters(), lr=0.1))
    >>> loss = opt.step(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    """

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, *, loss_fn=None,
                 output_fn=None):
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError("base_optimizer must be a constructed torch.optim.Optimizer")
        self.model, self.base_optimizer = model, base_optimizer
        self.loss_fn = loss_fn or per_example_loss
        self.output_fn = output_fn

    @property
    def param_groups(self):
        return self.base_optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def data_loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example losses ``[B]`` (validated)."""
        check_inputs(inputs)
        logits = model_logits(self.model, inputs, self.output_fn)
        if self.loss_fn is per_example_loss:
            check_head(logits.detach(), targets)
        loss = self.loss_fn(logits, targets)
        check_loss(loss, logits)
        return loss

    def objective(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(objective to differentiate, mean data loss)``."""
        loss = self.data_loss(inputs, targets).mean()
        return loss, loss

    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        self.base_optimizer.zero_grad(set_to_none=True)
        objective, loss = self.objective(inputs, targets)
        objective.backward()
        self.base_optimizer.step()
        return loss.detach()


class RegularizedSGD(SGDStep):
    """SGD on ``mean ℓ + γ_a mean_i ‖a_i‖² + γ_V ‖V‖_F²`` (SPEC 2.6).

    Parameters
    ----------
    gamma_act, gamma_weight : float
        ``γ_a`` and ``γ_V``.
    layers : list of str, optional
        Modules whose input activations are penalized (default: the final linear layer).
    head : str, optional
        The final linear layer (found automatically); its ``weight`` is ``V``.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> opt = RegularizedSGD(net, torch.optim.SGD(net.parameters(), lr=0.1), gamma_act=0.01,
    ...                      gamma_weight=0.01)
    >>> loss = opt.step(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    """

    def __init__(self, model, base_optimizer, gamma_act: float = 1e-2,
                 gamma_weight: float = 1e-2, *, layers=None, head: str | None = None,
                 loss_fn=None, output_fn=None):
        super().__init__(model, base_optimizer, loss_fn=loss_fn, output_fn=output_fn)
        for name, g in (("gamma_act", gamma_act), ("gamma_weight", gamma_weight)):
            if not isinstance(g, (int, float)) or not g >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {g!r}")
        self.gamma_act, self.gamma_weight = float(gamma_act), float(gamma_weight)
        self.layers, self.head = layers, head
        if head is not None:
            resolve_layers(model, [head])
        if layers is not None:
            resolve_layers(model, layers)

    def objective(self, inputs, targets):
        if self.head is None:
            self.head = find_head(self.model, inputs, self.output_fn)
        watched = resolve_layers(self.model, self.layers or [self.head])
        with capture_inputs(watched) as acts:
            loss = self.data_loss(inputs, targets).mean()
        B = inputs.shape[0]
        act = sum(a.pow(2).sum() for calls in acts.values() for a in calls) / B
        V = dict(self.model.named_modules())[self.head].weight
        return loss + self.gamma_act * act + self.gamma_weight * V.pow(2).sum(), loss

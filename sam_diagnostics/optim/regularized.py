"""Regularized SGD (SPEC 2.6), its J-SAM-matched adaptive form, and the plain SGD step.

    L = (1/B) Σ_i ℓ_i + γ_a (1/B) Σ_i ‖a_i‖² + γ_V ‖V‖_F²

with ``a_i`` the input of the final linear layer (or of any named layers, summed) and ``V`` its
weight: the two quantities J-SAM keeps small in a two-layer linear network (SPEC 2.5), at the
cost of one forward and one backward.

:class:`AdaptiveRegularizedSGD` ("adareg") replaces the two constant γ's by the per-example,
stop-gradient weights of the exact two-layer identity (SPEC 2.5), see its docstring.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..hooks import capture_inputs
from ..jacobian import check_inputs, check_loss, model_logits
from ..logit_terms import check_head, per_example_loss
from ..norms import find_head, resolve_layers

__all__ = ["SGDStep", "RegularizedSGD", "AdaptiveRegularizedSGD"]


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


class AdaptiveRegularizedSGD(SGDStep):
    """SGD plus the J-SAM-matched per-example penalty (the study's "adareg"), one SGD step's cost.

    Derivation. For ``f = V φ(W u + c) + b`` with ``φ`` the identity or ReLU (mask ``D_i`` held
    fixed; ``u_i`` the input of ``W``, ``a_i = φ(W u_i + c)`` the input of the head ``V``), the
    1-SAM offset of example ``i`` restricted to ``(V, b, W, c)`` is ``ε_i = ρ g_i / N_i`` with

        N_i² = ‖δ_i‖² (‖a_i‖² + 1_b) + ‖D_i Vᵀ δ_i‖² (‖u_i‖² + 1_c),   δ_i = ∂ℓ_i/∂z_i.

    Perturbing ``V`` by ``ε_V`` moves the Jacobian w.r.t. ``a`` by ``(ρ/N_i) ‖δ_i‖² a_i``;
    perturbing ``(W, c)`` moves ``a_i`` by ``(ρ/N_i)(‖u_i‖² + 1_c) D_i Vᵀ δ_i``. Contracted with the
    unperturbed ``δ_i`` (J-SAM), both extra gradients are exactly the gradient of

        P_i = ½ sg[ρ/N_i] (sg[‖δ_i‖²] ‖a_i‖² + sg[‖u_i‖² + 1_c] ‖D_i Vᵀ sg[δ_i]‖²),

    so this stepper minimizes ``mean_i (ℓ_i + P_i)``: the J-SAM update of the top two layers,
    exact for a two-layer linear network (SPEC 2.5, where it is the whole J-SAM step) and first
    order in ``ρ`` through ReLU masks. The deeper layers' share of ``N_i`` and their own Jacobian
    change are left out (they would need per-example backpropagation). When the layer below the
    head is not a ``Linear`` followed by identity/ReLU (e.g. a convolution), only the ``V``
    perturbation is kept: ``P_i = ½ sg[ρ/N_i] sg[‖δ_i‖²] ‖a_i‖²`` with
    ``N_i² = ‖δ_i‖² (‖a_i‖² + 1_b)``.

    Everything comes from the one forward pass (captured inputs of the two layers and the logits),
    so a step costs a few ``[B, width]`` products more than SGD.

    Parameters
    ----------
    rho : float
        The SAM radius whose J-SAM step is matched (the study uses 1-SAM's ρ or tunes it).
    head : str, optional
        The final linear layer (found automatically).
    below : str or None or False, optional
        The ``nn.Linear`` feeding the head (default: found automatically, the last ``Linear``
        registered before the head with matching width); ``False`` = head-only form.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> opt = AdaptiveRegularizedSGD(net, torch.optim.SGD(net.parameters(), lr=0.1), rho=0.05)
    >>> loss = opt.step(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    >>> opt.below
    '0'
    """

    def __init__(self, model, base_optimizer, rho: float = 0.05, *, head: str | None = None,
                 below: str | None | bool = None, loss_fn=None, output_fn=None):
        super().__init__(model, base_optimizer, loss_fn=loss_fn, output_fn=output_fn)
        if not isinstance(rho, (int, float)) or not rho >= 0:
            raise ValueError(f"rho must be a number >= 0, got {rho!r}")
        self.rho = float(rho)
        self.head, self.below = head, below
        for name in (head, below):
            if isinstance(name, str):
                resolve_layers(model, [name])
        self._warned = False
        self._minus_one: Tensor | None = None  # [B, 1] of -1 (the one-hot of δ), kept

    def _find_below(self) -> str | None:
        modules = dict(self.model.named_modules())
        head = modules[self.head]
        candidate = None
        for name, module in modules.items():
            if name == self.head:
                break
            if isinstance(module, nn.Linear):
                candidate = name
        if candidate is not None and modules[candidate].out_features == head.in_features:
            return candidate
        return None

    def _setup(self, inputs: Tensor) -> None:
        """Find the head and the layer below once; decide identity / ReLU / head-only."""
        if self.head is None:
            self.head = find_head(self.model, inputs, self.output_fn)
        if self.below is None:
            self.below = self._find_below() or False
        modules = dict(self.model.named_modules())
        self._head, self._below = modules[self.head], (modules[self.below] if self.below else None)
        self._mode = None
        if self._below is not None:
            outs: list[Tensor] = []
            hook = self._below.register_forward_hook(lambda m, a, o: outs.append(o.detach()))
            try:
                with capture_inputs({self.head: self._head}) as acts, torch.no_grad():
                    model_logits(self.model, inputs, self.output_fn)
            finally:
                hook.remove()
            pre, a = outs[-1], acts[self.head][-1].detach()
            if pre.shape == a.shape and torch.equal(pre, a):
                self._mode = "identity"
            elif pre.shape == a.shape and torch.equal(pre.clamp_min(0), a):
                self._mode = "relu"
            else:
                warnings.warn(f"adaptive regularizer: the head's input is not identity/ReLU of "
                              f"{self.below!r}'s output; using the head-only penalty",
                              RuntimeWarning, stacklevel=4)
                self.below, self._below = False, None

    def _weights(self, logits: Tensor, targets: Tensor, a: Tensor, u: Tensor | None):
        """No-grad parts: ``δ``, ``D Vᵀ δ`` and the per-example coefficients of ``‖a_i‖²``
        and ``‖D_i Vᵀ δ_i‖²`` in ``P_i / B`` (``λ_i ‖δ_i‖² / B`` and ``λ_i (‖u_i‖² + 1_c) / B``).

        Written with as few tensor operations as possible: at the study's sizes a step's extra
        cost is the number of small operations, not their arithmetic."""
        B = logits.shape[0]
        z = logits.detach()
        if self.loss_fn is per_example_loss and z.dim() == 2 and z.shape[1] > 1:
            # δ_i = softmax(z_i) - onehot(t_i); softmax written out: for a few classes
            # torch.softmax over the last dimension is several times slower on CPU
            delta = (z - z.amax(1, keepdim=True)).exp_()
            delta /= delta.sum(1, keepdim=True)
            if self._minus_one is None or self._minus_one.shape[0] != B:
                self._minus_one = z.new_full((B, 1), -1.0)
            delta.scatter_add_(1, targets.reshape(B, 1), self._minus_one)
        else:  # any per-example loss: δ_i = ∂ℓ_i/∂z_i by autograd on the detached logits
            with torch.enable_grad():
                z = z.requires_grad_(True)
                (delta,) = torch.autograd.grad(self.loss_fn(z, targets).sum(), z)
        with torch.no_grad():
            delta = delta.reshape(B, -1)
            a = a.detach().reshape(B, -1)
            d2 = torch.linalg.vecdot(delta, delta)
            n2 = torch.linalg.vecdot(a, a)
            if self._head.bias is not None:
                n2 += 1.0
            n2 *= d2
            back = u2 = None
            if u is not None:
                u = u.detach().reshape(B, -1)
                u2 = torch.linalg.vecdot(u, u)
                if self._below.bias is not None:
                    u2 += 1.0
                back = delta @ self._head.weight
                if self._mode == "relu":
                    back.mul_(a.sign())  # D_i (a is the ReLU output; sign is 0 or 1)
                n2.addcmul_(torch.linalg.vecdot(back, back), u2)
            lam = n2.clamp_min_(1e-30).rsqrt_().mul_(self.rho / B)
            return delta, back, d2.mul_(lam), (None if u2 is None else u2.mul_(lam))

    def _forward(self, inputs: Tensor, targets: Tensor):
        """``(inputs of the head and the layer below per call, logits, mean loss)``, checked."""
        watched = {self.head: self._head,
                   **({self.below: self._below} if self._below is not None else {})}
        check_inputs(inputs)
        with capture_inputs(watched) as acts:
            logits = model_logits(self.model, inputs, self.output_fn)
        if self.loss_fn is per_example_loss:
            check_head(logits.detach(), targets)
        losses = self.loss_fn(logits, targets)
        check_loss(losses, logits)
        return acts, logits, losses.mean()

    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """One step of ``mean_i (ℓ_i + P_i)``: the penalty's gradients are added in closed form
        (a second root ``a`` with gradient ``∂P/∂a`` in the same backward pass, and one
        ``[C, width]`` product for ``V``), so the step is one forward and one backward, like SGD.
        Same result as :meth:`objective`."""
        if not hasattr(self, "_mode"):
            self._setup(inputs)
        if self.rho == 0:
            return super().step(inputs, targets)
        self.base_optimizer.zero_grad(set_to_none=True)
        head, below = self._head, self._below
        acts, logits, loss = self._forward(inputs, targets)
        a = acts[self.head][-1]
        u = acts[self.below][-1] if below is not None else None
        delta, back, coef_a, coef_v = self._weights(logits, targets, a, u)
        if a.requires_grad:  # ∂P/∂a_i = coef_a_i a_i enters the same backward pass as the loss
            grad_a = a.detach() * coef_a.reshape((-1,) + (1,) * (a.dim() - 1))
            torch.autograd.backward((loss, a), (None, grad_a))
        else:
            loss.backward()
        if back is not None and head.weight.requires_grad:  # ∂P/∂V = Σ_i coef_v_i δ_i (D_i Vᵀ δ_i)ᵀ
            back.mul_(coef_v[:, None])
            if head.weight.grad is None:
                head.weight.grad = delta.t() @ back
            else:
                head.weight.grad.addmm_(delta.t(), back)
        self.base_optimizer.step()
        return loss.detach()

    def objective(self, inputs, targets):
        """``(mean_i (ℓ_i + P_i), mean ℓ)`` as a differentiable objective (the reference form
        of :meth:`step`, which adds the penalty's gradients in closed form instead)."""
        if not hasattr(self, "_mode"):
            self._setup(inputs)
        head, below = self._head, self._below
        acts, logits, loss = self._forward(inputs, targets)
        if self.rho == 0:
            return loss, loss
        B = inputs.shape[0]
        z = logits.detach()
        if self.loss_fn is per_example_loss and z.dim() == 2 and z.shape[1] > 1:
            delta = torch.softmax(z, 1)  # δ_i = softmax(z_i) - onehot(t_i)
            delta[torch.arange(B, device=z.device), targets] -= 1
        else:  # any per-example loss: δ_i = ∂ℓ_i/∂z_i by autograd on the detached logits
            with torch.enable_grad():
                z = z.requires_grad_(True)
                (delta,) = torch.autograd.grad(self.loss_fn(z, targets).sum(), z)
        delta = delta.reshape(B, -1)
        a = acts[self.head][-1].reshape(B, -1)
        d2 = delta.pow(2).sum(1)
        a2 = a.pow(2).sum(1)
        n2 = d2 * (a2.detach() + (1.0 if head.bias is not None else 0.0))
        penalty = d2 * a2
        if below is not None:
            u2 = acts[self.below][-1].reshape(B, -1).detach().pow(2).sum(1)
            u2 = u2 + (1.0 if below.bias is not None else 0.0)
            back = delta @ head.weight  # Vᵀ δ_i, differentiable in V only
            if self._mode == "relu":
                back = back * (a.detach() > 0).to(back.dtype)  # D_i
            back2 = back.pow(2).sum(1)
            n2 = n2 + back2.detach() * u2
            penalty = penalty + u2 * back2
        lam = self.rho / n2.clamp_min(1e-30).sqrt()
        return loss + 0.5 * (lam * penalty).sum() / B, loss

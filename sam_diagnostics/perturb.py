"""SAM perturbations ε (SPEC 2.1): every form of ε lives here.

* :func:`epsilon` — the one normalization ``ε = ρ T² g / ‖T g‖`` (``T = 1``, or ``|w|`` for
  ASAM), for one gradient or a stack of per-example / per-group gradients;
* :func:`radius_scale` — ``ρ / ‖g‖`` (and ``0`` for a zero gradient), used by the factored
  per-example offsets of 1-SAM (:meth:`sam_diagnostics.engine.Pass.offsets`);
* :func:`group_slices` — the groups of ``m`` examples of m-sharpness;
* :func:`perturbed` — a context in which the model's parameters are ``w + ε`` (one group) and
  after which they are restored bit-exactly (from saved copies, never by subtraction);
* :func:`sam_epsilon` — the inspectable form: every group's ε as data.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .hooks import kept_attributes

__all__ = ["sam_epsilon", "perturbed", "group_slices", "epsilon", "radius_scale", "check_rho_m"]


def check_rho_m(rho: float, m: int | None) -> None:
    """Validate the perturbation radius and group size."""
    if (not isinstance(rho, (int, float)) or isinstance(rho, bool) or not rho >= 0
            or not math.isfinite(rho)):
        raise ValueError(f"rho must be a finite number >= 0 (the perturbation radius), got "
                         f"{rho!r}")
    if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
        raise ValueError(
            f"m must be a positive integer (examples per perturbation group; 1 = 1-SAM) or None "
            f"(one perturbation for the whole batch), got {m!r}"
        )


def group_slices(batch_size: int, m: int | None) -> list[slice]:
    """Consecutive groups of ``m`` examples; the last group holds the remainder if ``m ∤ B``.

    Examples
    --------
    >>> group_slices(5, 2)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    m = batch_size if m is None else m
    return [slice(s, min(s + m, batch_size)) for s in range(0, batch_size, m)]


def radius_scale(rho: float, norm: Tensor) -> Tensor:
    """``ρ / norm``, and ``0`` where the norm is zero (a zero gradient gives ``ε = 0``)."""
    return torch.where(norm > 0, rho / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)


def epsilon(g: dict[str, Tensor], rho: float, params: dict[str, Tensor] | None = None,
            adaptive: bool = False, lead: int = 0) -> dict[str, Tensor]:
    """``ρ T² g / ‖T g‖`` with ``T = |w|`` (ASAM, ``params`` needed) or ``T = 1``.

    The norm runs over all tensors of ``g`` and over their dimensions after the first ``lead``
    (``lead = 1``: one ε per row, e.g. per example).

    Examples
    --------
    >>> eps = epsilon({"w": torch.tensor([3.0, 4.0])}, rho=1.0)
    >>> eps["w"]
    tensor([0.6000, 0.8000])
    """
    def t(n):
        return params[n].detach().abs() if adaptive else 1.0

    norm = sum((t(n) * v).reshape(*v.shape[:lead], -1).pow(2).sum(-1) for n, v in g.items())
    scale = radius_scale(rho, torch.as_tensor(norm).sqrt())
    return {n: scale.reshape(tuple(scale.shape) + (1,) * (v.dim() - lead)) * (t(n) ** 2) * v
            for n, v in g.items()}


@contextlib.contextmanager
def perturbed(model: nn.Module, eps: dict[str, Tensor]) -> Iterator[nn.Module]:
    """Evaluate ``model`` at ``w + ε`` inside the block; ``w`` is restored bit-exactly after.

    Parameters
    ----------
    eps : dict
        ``{parameter name: tensor of the parameter's shape}`` (e.g. one group of
        :func:`sam_epsilon`: ``{n: e[g] for n, e in eps.items()}``). Only trainable
        parameters may be perturbed.

    Examples
    --------
    >>> net = nn.Linear(2, 1)
    >>> w = net.weight.clone()
    >>> with perturbed(net, {"weight": torch.ones(1, 2)}):
    ...     bool((net.weight == w + 1).all())
    True
    >>> bool(torch.equal(net.weight, w))
    True
    """
    named = dict(model.named_parameters())
    for n, e in eps.items():
        if n not in named:
            raise ValueError(f"eps names parameter {n!r}, which the model does not have")
        if not named[n].requires_grad:
            raise ValueError(f"parameter {n!r} is frozen (requires_grad=False); SAM gives it ε = 0")
        if e.shape != named[n].shape:
            raise ValueError(f"eps[{n!r}] has shape {tuple(e.shape)}, the parameter "
                             f"{tuple(named[n].shape)}")
    saved = {n: named[n].detach().clone() for n in eps}
    try:
        with torch.no_grad():
            for n, e in eps.items():
                named[n].add_(e.to(named[n].dtype))
        torch.clear_autocast_cache()  # autocast's cached low-precision weights are of w
        with kept_attributes(model):  # weights derived in the forward (legacy weight_norm)
            yield model
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                named[n].copy_(w)
        torch.clear_autocast_cache()


def sam_epsilon(model: nn.Module, inputs: Tensor, targets: Tensor, rho: float, m: int | None = 1,
                *, loss_fn=None, output_fn=None, adaptive: bool = False) -> dict[str, Tensor]:
    """The SAM perturbation of every group, ``{param name: [G, *shape]}``.

    ``ε_g = ρ ∇L_g / ‖∇L_g‖₂`` where ``L_g`` is the mean loss of group ``g``, the norm runs over
    all trainable parameters, and groups are :func:`group_slices` ``(B, m)``. With
    ``adaptive=True`` it is ASAM's ``ρ T² ∇L_g / ‖T ∇L_g‖`` with ``T = |w|``. A zero gradient
    gives ``ε = 0``. Computed at ``w`` in the model's current mode; the model is not changed.
    Memory ``O(G × parameters)``: this is the inspectable form; training and probes use the
    factored offsets of :meth:`sam_diagnostics.engine.Pass.offsets`.

    Examples
    --------
    >>> net = nn.Linear(3, 2)
    >>> eps = sam_epsilon(net, torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), rho=0.1)
    >>> eps["weight"].shape
    torch.Size([4, 2, 3])
    """
    from .engine import Engine, check_inputs, check_targets, logit_grad

    check_rho_m(rho, m)
    check_inputs(inputs, model)
    check_targets(targets, inputs)
    engine = Engine(model, output_fn=output_fn, method="exact", loss_fn=loss_fn)
    params = engine.params()
    parts = []
    with torch.enable_grad():
        if m == 1:  # per-example gradients of the exact plan, all at once
            p = engine.run(engine.plan(inputs), inputs)
            g = p.per_example_grads(logit_grad(engine.loss_fn, p.logits, targets))
            return epsilon(g, rho, params, adaptive, lead=1)
        for s in group_slices(inputs.shape[0], m):
            p = engine.run(engine.plan(inputs[s]), inputs[s])
            g = p.grad(logit_grad(engine.loss_fn, p.logits, targets[s]) / (s.stop - s.start))
            parts.append(epsilon(g, rho, params, adaptive))
    return {n: torch.stack([q[n] for q in parts]) for n in params}

"""SAM perturbations ε (SPEC 2.1), as data and as a place to evaluate the model.

* :func:`sam_epsilon` — ``ε_g = ρ ∇L_g(w) / ‖∇L_g(w)‖`` for every group ``g`` of ``m`` examples
  (``m = 1``: per-example ``ε_i``, the paper's 1-SAM; ``m = None``: one ε for the batch), as a
  dict of tensors with a leading group dimension. Frozen parameters get no ε.
* :func:`perturbed` — a context in which the model's parameters are ``w + ε`` and after which
  they are restored bit-exactly (from saved copies, never by subtraction), also on exceptions.
* :func:`per_example_offsets` — the same ``ε_i`` for ``m = 1`` without materializing them: the
  per-layer rules turn the recorded pass at ``w`` into offsets that hooks apply in the next pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .hooks import Capture
from .jacobian import check_loss, model_logits

__all__ = ["sam_epsilon", "perturbed", "group_slices", "per_example_offsets", "check_rho_m"]


def check_rho_m(rho: float, m: int | None) -> None:
    """Validate the perturbation radius and group size."""
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not rho >= 0:
        raise ValueError(f"rho must be a number >= 0 (the perturbation radius), got {rho!r}")
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


def _normalize(g: dict[str, Tensor], rho: float, params: dict[str, Tensor], adaptive: bool,
               lead: int) -> dict[str, Tensor]:
    """``ρ T² g / ‖T g‖`` with ``T = |w|`` (ASAM) or ``T = 1``; norms over the non-leading dims."""
    def t(n):
        return params[n].abs() if adaptive else 1.0

    norm = sum((t(n) * v).flatten(lead).pow(2).sum(-1) for n, v in g.items()).sqrt()
    scale = radius_scale(rho, norm)
    return {
        n: scale.reshape(*scale.shape, *[1] * (v.dim() - lead)) * (t(n) ** 2) * v
        for n, v in g.items()
    }


def sam_epsilon(model: nn.Module, inputs: Tensor, targets: Tensor, rho: float, m: int | None = 1,
                *, loss_fn=None, output_fn=None, adaptive: bool = False) -> dict[str, Tensor]:
    """The SAM perturbation of every group, ``{param name: [G, *shape]}``.

    ``ε_g = ρ ∇L_g / ‖∇L_g‖₂`` where ``L_g`` is the mean loss of group ``g``, the norm runs over
    all trainable parameters, and groups are :func:`group_slices` ``(B, m)``. With
    ``adaptive=True`` it is ASAM's ``ρ T² ∇L_g / ‖T ∇L_g‖`` with ``T = |w|``. A zero gradient
    gives ``ε = 0``. Computed at ``w`` in the model's current mode; the model is not changed.
    Memory ``O(G × parameters)``: this is the inspectable form; training and probes use
    :func:`per_example_offsets`.

    Examples
    --------
    >>> net = nn.Linear(3, 2)
    >>> eps = sam_epsilon(net, torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), rho=0.1)
    >>> eps["weight"].shape
    torch.Size([4, 2, 3])
    """
    from .logit_terms import per_example_loss

    check_rho_m(rho, m)
    loss_fn = loss_fn or per_example_loss
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    const = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    const.update(dict(model.named_buffers()))
    with torch.no_grad():
        logits = model_logits(model, inputs, output_fn)
        check_loss(loss_fn(logits, targets), logits)
    core = getattr(loss_fn, "unchecked", loss_fn)  # no data-dependent checks inside vmap

    def group_loss(p, x, y):
        out = functional_call(model, {**const, **p}, (x,))
        z = output_fn(out) if output_fn is not None else out
        return core(z, y).mean()

    if m == 1:
        g = vmap(grad(lambda p, x, y: group_loss(p, x[None], y[None])), in_dims=(None, 0, 0))(
            params, inputs, targets)
    else:
        parts = [grad(group_loss)(params, inputs[s], targets[s])
                 for s in group_slices(inputs.shape[0], m)]
        g = {n: torch.stack([q[n] for q in parts]) for n in params}
    return _normalize(g, rho, params, adaptive, lead=1)


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
        yield model
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                named[n].copy_(w)


def radius_scale(rho: float, norm: Tensor) -> Tensor:
    """``ρ / norm``, and ``0`` where the norm is zero (a zero gradient gives ``ε = 0``)."""
    return torch.where(norm > 0, rho / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)


def per_example_offsets(cap: Capture, grad_cots: dict, rho: float) -> tuple[dict, dict]:
    """1-SAM's ``ε_i = ρ g_i / ‖g_i‖`` in factored form, from a recorded pass at ``w``.

    ``grad_cots`` are the output cotangents of ``Σ_i ℓ_i`` (one direction: the logit term).
    Returns ``({block: ‖g_i‖² restricted to the block [B]}, offsets)``; the offsets
    ``{entry: state}`` make a :class:`~sam_diagnostics.hooks.Capture` evaluate every example at
    its own ``w + ε_i`` without materializing any ``ε_i`` (for Linear layers
    ``W a' + c_i δ_i (a_i · a')``). Per-example gradients a rule materializes for the norm are
    reused for the offsets, not computed twice.
    """
    sq, grads = {}, {}
    for name, rec in cap.records.items():
        if rec.calls:
            module, rule = cap.plan.entries[name]
            parts, grads[name] = rule.norms_and_grads(module, rec.calls, grad_cots[name])
            if parts:
                sq[name] = sum(parts.values())
    if not sq:  # nothing trainable: ε = 0
        return sq, {}
    scale = radius_scale(rho, sum(sq.values()).sqrt())
    offsets = {}
    for name, g in grads.items():
        module, rule = cap.plan.entries[name]
        offsets[name] = rule.prepare(module, cap.records[name].calls, grad_cots[name], scale, g)
    return sq, offsets

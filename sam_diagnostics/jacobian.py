"""Per-example Jacobian and gradient norms (SPEC 2.3), exact, by two engines.

Both engines compute, for ``K`` cotangent directions ``v_k`` at the logits, the per-example
``Σ_k ‖J_iᵀ v_{k,i}‖²`` for every parameter block:

* ``"fast"`` — the per-layer rules of :mod:`sam_diagnostics.rules`, from the recorded layer
  inputs and output cotangents; memory ``O(B × layer width)``;
* ``"exact"`` — torch.func: ``functional_call`` + ``vmap`` of a per-example ``vjp``, in chunks of
  examples so memory stays bounded; works for any model whose examples are independent.

The directions decide the quantity: the ``C`` one-hot directions give ``‖J_i‖_F²`` (the network
Jacobian norm), the logit term ``δ_i`` gives ``‖∇_w ℓ_i‖²`` and ``k`` Rademacher directions give
Hutchinson's unbiased estimate of ``‖J_i‖_F²``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .hooks import Capture, Plan, make_plan, measuring, traced
from .logit_terms import check_head, per_example_loss
from .rules import NotFastError

__all__ = ["jacobian_norms", "grad_norms", "METHODS"]

METHODS = ("auto", "exact", "fast", "hutchinson")

Directions = Callable[[Tensor, object], Tensor]  # (logits [B, *], aux) -> [K, B, *]


def model_logits(model: nn.Module, inputs: Tensor, output_fn=None) -> Tensor:
    """``output_fn(model(inputs))``, checked to be a ``[B]`` / ``[B, C]`` tensor."""
    out = model(inputs)
    if output_fn is not None:
        out = output_fn(out)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the model returned {type(out).__name__}; pass output_fn=... that picks the logits "
            "tensor (e.g. output_fn=lambda out: out['logits'])"
        )
    if out.dim() not in (1, 2) or out.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"the model's logits must have shape [B, C] or [B] with B = {inputs.shape[0]}, got "
            f"{tuple(out.shape)}; pass output_fn=... to reshape them"
        )
    return out


def check_inputs(inputs) -> None:
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError("empty batch: inputs must have a leading batch dimension of size >= 1")
    if inputs.is_floating_point() and not torch.isfinite(inputs).all():
        raise ValueError("inputs contain NaN or Inf; clean the data before measuring")


# --------------------------------------------------------------------------- directions
def one_hot_directions(logits: Tensor, aux=None) -> Tensor:
    """The ``C`` one-hot cotangents, ``[C, B, C]`` (``[1, B]`` for a binary head)."""
    if logits.dim() == 1:
        return torch.ones_like(logits)[None]
    C = logits.shape[1]
    eye = torch.eye(C, dtype=logits.dtype, device=logits.device)
    return eye[:, None, :].expand(C, logits.shape[0], C)


def probe_directions(logits: Tensor, aux: Tensor) -> Tensor:
    """Rademacher directions given as ``aux [B, k, *]`` -> ``[k, B, *]``, scaled by 1/√k."""
    return aux.transpose(0, 1) / aux.shape[1] ** 0.5


def loss_directions(loss_fn) -> Directions:
    """The per-example loss gradient at the logits, ``∂ℓ_i/∂z_i`` (unscaled), as ``[1, B, *]``."""

    def directions(logits: Tensor, targets: Tensor) -> Tensor:
        if loss_fn is per_example_loss:  # clear errors for bad targets / non-finite logits
            check_head(logits, targets)
        with torch.enable_grad():
            z = logits.detach().requires_grad_(True)
            loss = loss_fn(z, targets)
            check_loss(loss, z)
            (d,) = torch.autograd.grad(loss.sum(), z)
        return d[None]

    return directions


def check_loss(loss: Tensor, logits: Tensor) -> None:
    if not isinstance(loss, Tensor) or loss.shape != logits.shape[:1]:
        raise ValueError(
            f"loss_fn must return per-example losses of shape [B] = [{logits.shape[0]}], got "
            f"{getattr(loss, 'shape', type(loss))}; e.g. functools.partial(F.cross_entropy, "
            "reduction='none')"
        )


# --------------------------------------------------------------------------- engines
def fast_block_sq_norms(model, inputs, directions: Directions, aux, plan: Plan, output_fn=None,
                        offsets=None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-layer engine: ``(logits, {block: Σ_k ‖J_iᵀ v_k‖² [B]})``; raises NotFastError."""
    if plan.problem:
        raise NotFastError(plan.problem)
    x = traced(inputs)
    with torch.enable_grad(), Capture(plan, offsets, inputs=x) as cap:
        logits = model_logits(model, x, output_fn)
    cap.check_all_fired(logits)
    dirs = directions(logits.detach(), aux)
    return logits.detach(), cap.sq_norms(cap.cotangents(logits, dirs))


def _functional(model: nn.Module, output_fn):
    """A pure single-example function ``f(params, x) -> logits`` and the trainable params."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    const = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    const.update(dict(model.named_buffers()))

    def f(p, x):
        out = functional_call(model, {**const, **p}, (x.unsqueeze(0),))
        return (output_fn(out) if output_fn is not None else out)[0]

    return f, params


def _chunk(n_params: int, K: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return chunk_size
    return max(1, min(256, 2**26 // max(1, n_params * max(K, 1))))


def exact_block_sq_norms(model, inputs, directions: Directions, aux, plan: Plan, output_fn=None,
                         eps: dict | None = None, chunk_size: int | None = None):
    """torch.func engine: ``(logits, {block: [B]})``; ``eps`` = per-example offsets ``[B, *]``."""
    f, params = _functional(model, output_fn)
    block = plan.block_of()
    eps_dims = 0 if eps is not None else None

    def at(p, e):
        return {n: p[n] + e[n] for n in p} if e is not None else p

    n_params = sum(p.numel() for p in params.values())
    with torch.no_grad():
        logits = vmap(lambda e, x: f(at(params, e), x), in_dims=(eps_dims, 0),
                      chunk_size=_chunk(n_params, 1, chunk_size))(eps, inputs)
    dirs = directions(logits, aux)  # [K, B, *]

    def one(e, x, d):
        _, pullback = vjp(lambda p: f(at(p, e), x), params)
        g = vmap(lambda v: pullback(v)[0])(d)  # {name: [K, *shape]}
        sq: dict[str, Tensor] = {}
        for n, v in g.items():
            s = v.pow(2).sum()
            sq[block[n]] = sq[block[n]] + s if block[n] in sq else s
        return sq

    sq = vmap(one, in_dims=(eps_dims, 0, 1),
              chunk_size=_chunk(n_params, dirs.shape[0], chunk_size))(eps, inputs, dirs)
    return logits, sq


def block_sq_norms(model, inputs, directions: Directions, aux=None, *, method="auto",
                   plan: Plan | None = None, output_fn=None, chunk_size=None):
    """Dispatch to the fast engine (``"auto"`` falls back to torch.func where it cannot)."""
    plan = plan or make_plan(model)
    if method in ("fast", "auto"):
        try:
            return fast_block_sq_norms(model, inputs, directions, aux, plan, output_fn)
        except NotFastError as err:
            if method == "fast":
                raise ValueError(
                    f"method='fast' cannot be exact for this model: {err}; use method='exact' "
                    "or 'auto'"
                ) from err
    return exact_block_sq_norms(model, inputs, directions, aux, plan, output_fn,
                                chunk_size=chunk_size)


def _finish(sq: dict[str, Tensor], per_block: bool, like: Tensor):
    if per_block:
        return {name: v.clamp_min(0).sqrt() for name, v in sq.items()}
    total = sum(sq.values()) if sq else like.new_zeros(like.shape[0])
    return total.clamp_min(0).sqrt()


def jacobian_norms(model: nn.Module, inputs: Tensor, method: str = "auto", *, output_fn=None,
                   per_block: bool = False, num_probes: int = 1,
                   generator: torch.Generator | None = None, chunk_size: int | None = None):
    """Per-example network Jacobian norm ``‖∂ z_i / ∂θ‖_F`` over the trainable parameters.

    Parameters
    ----------
    model : nn.Module
        Measured in eval mode (dropout off, BatchNorm with running statistics); its modes,
        parameters, buffers, ``requires_grad`` flags and the global RNG are left as they were.
    inputs : Tensor
        A batch ``[B, ...]``.
    method : {"auto", "exact", "fast", "hutchinson"}
        ``"fast"``: per-layer rules (C input-gradient backward passes, no per-example gradients
        materialized); ``"exact"``: torch.func ``vmap`` of per-example VJPs, chunked;
        ``"auto"``: ``"fast"`` wherever it is exact for the model (no tied weights, no parameter
        used outside its module), else ``"exact"``; ``"hutchinson"``: unbiased estimate of
        ``‖J_i‖_F²`` from ``num_probes`` Rademacher directions ``v`` (``E‖J_iᵀv‖² = ‖J_i‖_F²``,
        variance ``2(‖J_iJ_iᵀ‖_F² − Σ_c (J_iJ_iᵀ)_cc²)/k``: zero when the rows of ``J_i`` are
        orthogonal, relative error typically a few percent at ``k = 1``; the square root of an
        unbiased estimate is slightly biased low).
    output_fn : callable, optional
        Picks the logits from the model's output (tuple or dict outputs).
    per_block : bool
        Return ``{module name: [B]}`` norms per parameter block instead of the total.
    num_probes, generator
        Hutchinson's number of probes and the generator drawing them (the global RNG is never
        used).
    chunk_size : int, optional
        Examples per vmap chunk of the torch.func engine (default: bounded memory).

    Returns
    -------
    Tensor ``[B]`` (or a dict of them when ``per_block``).

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> jacobian_norms(net, torch.randn(5, 4)).shape
    torch.Size([5])
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_inputs(inputs)
    with measuring(model):
        if method == "hutchinson":
            if num_probes < 1:
                raise ValueError(f"num_probes must be >= 1, got {num_probes}")
            with torch.no_grad():
                shape = model_logits(model, inputs, output_fn).shape
            v = torch.randint(0, 2, (shape[0], num_probes, *shape[1:]), generator=generator)
            v = (2 * v - 1).to(dtype=inputs.dtype if inputs.is_floating_point()
                               else torch.get_default_dtype(), device=inputs.device)
            logits, sq = block_sq_norms(model, inputs, probe_directions, v, method="auto",
                                        output_fn=output_fn, chunk_size=chunk_size)
        else:
            logits, sq = block_sq_norms(model, inputs, one_hot_directions, method=method,
                                        output_fn=output_fn, chunk_size=chunk_size)
    check_finite_logits(logits)
    return _finish(sq, per_block, logits)


def grad_norms(model: nn.Module, inputs: Tensor, targets: Tensor, method: str = "auto", *,
               loss_fn=None, output_fn=None, per_block: bool = False,
               chunk_size: int | None = None):
    """Per-example loss-gradient norm ``‖∇_θ ℓ_i‖ = ‖J_iᵀ δ_i‖`` (unscaled: no ``1/B``).

    ``loss_fn(logits, targets)`` must return per-example losses ``[B]`` (default: cross-entropy
    for ``[B, C]`` logits, logistic loss for binary heads). Other arguments as in
    :func:`jacobian_norms` (``method`` in {"auto", "exact", "fast"}).

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> grad_norms(net, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])).shape
    torch.Size([5])
    """
    if method not in ("auto", "exact", "fast"):
        raise ValueError(f"method must be 'auto', 'exact' or 'fast' for grad_norms, got {method!r}")
    check_inputs(inputs)
    loss_fn = loss_fn or per_example_loss
    with measuring(model):
        logits, sq = block_sq_norms(model, inputs, loss_directions(loss_fn), targets,
                                    method=method, output_fn=output_fn, chunk_size=chunk_size)
    return _finish(sq, per_block, logits)


def check_finite_logits(logits: Tensor) -> None:
    if not torch.isfinite(logits).all():
        raise ValueError("the model's logits contain NaN or Inf; the model has diverged")

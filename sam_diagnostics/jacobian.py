"""Per-example Jacobian and gradient norms (SPEC 2.3): thin clients of the engine.

For ``K`` cotangent directions ``v_k`` at the logits the engine gives per-example
``Σ_k ‖J_iᵀ v_{k,i}‖²`` per parameter block. The directions decide the quantity: the ``C``
one-hot directions give ``‖J_i‖_F²`` (the network Jacobian norm), the logit term ``δ_i`` gives
``‖∇_w ℓ_i‖²`` and ``k`` Rademacher directions give Hutchinson's unbiased estimate of
``‖J_i‖_F²``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .engine import (
    Engine,
    call_model,
    check_inputs,
    check_loss,
    check_targets,
    logit_grad,
    one_hot_directions,
)
from .errors import NonFiniteError
from .hooks import measuring, unwrap
from .logit_terms import per_example_loss

__all__ = ["jacobian_norms", "grad_norms", "METHODS", "model_logits", "check_inputs",
           "check_loss"]

METHODS = ("auto", "exact", "fast", "hutchinson")

#: Hutchinson's probes when no generator is given: a private generator seeded once from
#: ``torch.initial_seed()`` that advances with every call (fresh probes each call, so averages
#: over calls converge), leaving the global RNG untouched.
_PROBES: dict[str, torch.Generator] = {}

model_logits = call_model  # the name record/regularized code uses


def _probe_generator() -> torch.Generator:
    if "cpu" not in _PROBES:
        _PROBES["cpu"] = torch.Generator().manual_seed(torch.initial_seed() % 2**63)
    return _PROBES["cpu"]


def _cat(parts: list) -> tuple[Tensor, dict[str, Tensor]]:
    """Concatenate ``(logits, {block: [b]})`` of consecutive chunks."""
    if len(parts) == 1:
        return parts[0]
    blocks = {k for _, sq in parts for k in sq}
    return torch.cat([z for z, _ in parts]), {
        k: torch.cat([sq[k] if k in sq else z.new_zeros(z.shape[0]) for z, sq in parts])
        for k in blocks}


def _finish(sq: dict[str, Tensor], per_block: bool, logits: Tensor):
    if not torch.isfinite(logits).all():
        raise NonFiniteError("the model's logits contain NaN or Inf; the model has diverged")
    if per_block:
        return {name: v.clamp_min(0).sqrt() for name, v in sq.items()}
    total = sum(sq.values()) if sq else logits.new_zeros(logits.shape[0])
    return total.clamp_min(0).sqrt()


def jacobian_norms(model: nn.Module, inputs: Tensor, method: str = "auto", *, output_fn=None,
                   per_block: bool = False, num_probes: int = 1,
                   generator: torch.Generator | None = None):
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
        materialized), or a ``ValueError`` where they cannot be exact for this model;
        ``"exact"``: torch.func per-example VJPs (a per-example loop for recurrent layers);
        ``"auto"``: the per-layer rules where they are proven exact for this model (structure,
        batch axes and a numeric self-check, once per model and input signature), else exact;
        ``"hutchinson"``: unbiased estimate of ``‖J_i‖_F²`` from ``num_probes`` Rademacher
        directions ``v`` (``E‖J_iᵀv‖² = ‖J_i‖_F²``; the square root is slightly biased low).
    output_fn : callable, optional
        Picks the logits from the model's output (tuple or dict outputs).
    per_block : bool
        Return ``{module name: [B]}`` norms per parameter block instead of the total.
    num_probes, generator
        Hutchinson's number of probes and the generator drawing them. Without a generator the
        probes come from a private generator (seeded once from ``torch.initial_seed()``) that
        advances with every call: repeated calls give fresh, independent estimates; the global
        RNG is never used. Pass a generator to control them.

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
    if method == "hutchinson" and (not isinstance(num_probes, int) or num_probes < 1):
        raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}")
    model = unwrap(model)
    engine = Engine(model, output_fn=output_fn,
                    method="auto" if method == "hutchinson" else method)
    check_inputs(inputs, model)

    gen = generator if generator is not None else _probe_generator()

    def norms(plan, s):
        p = engine.run(plan, inputs[s])
        z = p.logits.detach()
        if method != "hutchinson":
            return z, p.sq_norms(one_hot_directions(z))
        v = torch.randint(0, 2, (num_probes, *z.shape), generator=gen)
        return z, p.sq_norms((2 * v - 1).to(z) / num_probes ** 0.5)

    with measuring(model):
        logits, sq = _cat(engine.per_chunk(inputs, norms))
    return _finish(sq, per_block, logits)


def grad_norms(model: nn.Module, inputs: Tensor, targets: Tensor, method: str = "auto", *,
               loss_fn=None, output_fn=None, per_block: bool = False):
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
    loss_fn = loss_fn or per_example_loss
    model = unwrap(model)
    engine = Engine(model, output_fn=output_fn, method=method, loss_fn=loss_fn)
    check_inputs(inputs, model)
    check_targets(targets, inputs)

    def norms(plan, s):
        p = engine.run(plan, inputs[s])
        return p.logits.detach(), p.sq_norms(logit_grad(loss_fn, p.logits, targets[s])[None])

    with measuring(model):
        logits, sq = _cat(engine.per_chunk(inputs, norms))
    return _finish(sq, per_block, logits)

"""The rule protocol: one call record, one streaming accumulator, one registry.

A rule knows, for one module type, how to turn a recorded call (the module's input ``x`` and
output) and output cotangents into

* per-example squared parameter-gradient norms, streamed one direction at a time
  (:meth:`Rule.accumulator` → :meth:`Accumulator.add` per direction →
  :meth:`Accumulator.result`), without materializing per-example gradients where a cheaper
  ("ghost" / Gram) form exists, and
* per-example parameter offsets ``Δ_i = c_i g_i`` from the last direction added
  (:meth:`Accumulator.offsets`) and the module's output at ``θ + Δ_i`` (:meth:`Rule.apply`),
  used for the SAM view and for 1-SAM.

Rules are looked up by **exact** module type: a subclass that overrides ``forward`` (a LoRA
``nn.Linear``, a weight-standardized ``Conv2d``) is not its parent, and a parametrized module
(``torch.nn.utils.parametrize``) has a type of its own. Both then get the torch.func fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["Call", "Entry", "Rule", "Accumulator", "MaterializedAccumulator", "register_rule",
           "rule_for", "RULES", "sumsq", "gram_sum", "acc_dtype", "CHUNK_ELEMENTS"]

#: Per-example gradients are materialized in chunks of at most this many elements
#: (256 MiB in float32), so a large layer never costs K × B × its parameters at once.
CHUNK_ELEMENTS = 2**26


def acc_dtype(x: Tensor) -> torch.dtype:
    """Norms accumulate in float32 or better (bf16/fp16 under autocast)."""
    return torch.promote_types(x.dtype, torch.float32)


def sumsq(x: Tensor, dim) -> Tensor:
    """``Σ x²`` over ``dim`` as one fused reduction (no squared copy of ``x``), accumulated in
    float32 or better."""
    return torch.linalg.vector_norm(x, dim=dim, dtype=acc_dtype(x)).square()


def gram_sum(a: Tensor, b: Tensor, dim) -> Tensor:
    """``Σ a ⊙ b`` over ``dim`` (two Gram matrices), accumulated in float32 or better."""
    t = acc_dtype(a)
    return (a.to(t) * b.to(t)).sum(dim=dim)


@dataclass
class Call:
    """One recorded call of a module.

    ``args``/``kwargs`` are the call's inputs (detached), ``out`` its output (in the autograd
    graph while recording), ``in_dims`` the batch axis of every flattened input (``args`` then
    ``kwargs`` values; ``None`` = shared by all examples) and ``out_dim`` the output's batch axis,
    as established by the plan's batch-axis probe.
    """

    args: tuple
    kwargs: dict
    out: Tensor | None = None
    in_dims: tuple | None = None
    out_dim: int = 0
    cache: dict = field(default_factory=dict)  # tensors a rule derives once per call (x̂, ...)

    @property
    def x(self) -> Tensor:
        """The first positional input (what the per-layer rules read)."""
        return self.args[0]

    def flat(self) -> list:
        return list(self.args) + list(self.kwargs.values())


@dataclass
class Entry:
    """A module of the plan with the rule that computes its parameters' per-example quantities.

    ``params`` maps the parameter names the entry covers (relative to ``module``) to the
    parameters; with ``rule.subtree`` they include the module's whole subtree. ``fn`` evaluates
    the entry functionally (the fallback rule uses it): ``fn(params, args, kwargs) -> Tensor``.
    ``loop`` asks the fallback for a per-example Python loop instead of ``vmap`` (modules without
    batching rules, e.g. ``nn.LSTM``).
    """

    name: str
    module: nn.Module
    rule: Rule
    params: dict[str, Tensor]
    fn: Any = None
    loop: bool = False
    dims: list = field(default_factory=list)  # (in_dims, out_dim) per call, from the probe

    def full(self, pname: str) -> str:
        return f"{self.name}.{pname}" if self.name else pname


class Accumulator:
    """Per-example ``Σ_k ‖g_{k,i}‖²`` per parameter, fed one output-cotangent direction at a
    time: ``add(cots)`` with one tensor ``[B, *out]`` per recorded call."""

    def add(self, cots: Sequence[Tensor]) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, Tensor]:
        """``{param name: [B]}`` summed over the directions added so far."""
        raise NotImplementedError

    def offsets(self, scale: Tensor):
        """State for :meth:`Rule.apply`: ``Δ_i = scale_i · g_i`` of the last direction added."""
        raise NotImplementedError


class MaterializedAccumulator(Accumulator):
    """Generic accumulator: per-example gradients of one direction, summed over calls, squared.

    ``grads(call, b) -> {name: [B, *shape]}`` is the rule's per-example gradient of one call.
    """

    def __init__(self, grads, calls: Sequence[Call]):
        self.grads, self.calls = grads, calls
        self.total: dict[str, Tensor] = {}
        self.last: dict[str, Tensor] = {}

    def add(self, cots):
        g: dict[str, Tensor] = {}
        for call, b in zip(self.calls, cots):
            for n, v in self.grads(call, b).items():
                g[n] = g[n] + v if n in g else v
        for n, v in g.items():
            s = sumsq(v.reshape(v.shape[0], -1), 1)
            self.total[n] = self.total[n] + s if n in self.total else s
        self.last = g

    def result(self):
        return self.total

    def offsets(self, scale):
        return {n: g * scale.reshape(-1, *[1] * (g.dim() - 1)).to(g.dtype)
                for n, g in self.last.items()}


class Rule:
    """Base class of the per-layer rules.

    Attributes
    ----------
    params : tuple of str
        The module's own parameter names the rule differentiates. A module whose trainable
        parameters are not all among them (legacy ``weight_norm``'s ``weight_g``/``weight_v``)
        gets the fallback instead.
    subtree : bool
        The rule covers the module's whole subtree (the torch.func fallback), so the plan does
        not descend into its children.
    """

    params: ClassVar[tuple[str, ...]] = ("weight", "bias")
    subtree: ClassVar[bool] = False

    def covers(self, module: nn.Module) -> bool:
        """Whether the rule is exact for this instance (e.g. no ``max_norm``)."""
        return True

    def grads(self, entry: Entry, call: Call, b: Tensor) -> dict[str, Tensor]:
        """Per-example gradients ``{name: [B, *shape]}`` of one call for one direction ``b``."""
        raise NotImplementedError

    def accumulator(self, entry: Entry, calls: Sequence[Call], state=None) -> Accumulator:
        """A fresh accumulator over the entry's recorded calls (default: materialized)."""
        return MaterializedAccumulator(lambda c, b: self.grads(entry, c, b), calls)

    def apply(self, entry: Entry, state, call: Call) -> Tensor:
        """The output of ``call`` (whose ``out`` is the output at ``θ``) at ``θ + Δ_i``."""
        raise NotImplementedError


RULES: dict[type, Rule] = {}


def register_rule(*module_types: type):
    """Class decorator registering a :class:`Rule` for exactly these module types.

    Examples
    --------
    >>> class Scale(nn.Module): ...
    >>> @register_rule(Scale)
    ... class ScaleRule(Rule):
    ...     params = ("gain",)
    """

    def deco(cls):
        for t in module_types:
            RULES[t] = cls()
        return cls

    return deco


def rule_for(module: nn.Module) -> Rule | None:
    """The rule registered for ``type(module)`` exactly (subclasses are not their parent)."""
    return RULES.get(type(module))

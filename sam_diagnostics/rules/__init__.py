"""Per-layer rules: exact per-example parameter-gradient norms and per-example perturbations.

One place holds the special cases (the BackPACK / Opacus idea), one file per layer family:

* :mod:`.linear` — ``nn.Linear`` (ghost norm, Gram form for sequences),
* :mod:`.embedding` — ``nn.Embedding`` (Gram form with an index mask),
* :mod:`.conv` — ``nn.Conv1d`` / ``nn.Conv2d`` (unfolded patches or Gram form),
* :mod:`.norm` — ``nn.LayerNorm`` / ``nn.GroupNorm`` (affine parameters),
* :mod:`.fallback` — any other module: torch.func per-example VJPs over its subtree.

The protocol is in :mod:`.base`: a rule opens an accumulator over a module's recorded calls,
consumes one output-cotangent direction at a time and returns per-example squared norms; for
the SAM view it turns the last direction into per-example offsets and evaluates the module at
them. Add a layer type with :func:`register_rule` and one small class (and its test).
"""

from __future__ import annotations

from . import conv, embedding, linear, norm  # noqa: F401  (registers the rules)
from .base import (
    RULES,
    Accumulator,
    Call,
    Entry,
    MaterializedAccumulator,
    Rule,
    register_rule,
    rule_for,
    sumsq,
)
from .fallback import FALLBACK, FallbackRule, functional, per_example

__all__ = ["RULES", "Accumulator", "Call", "Entry", "MaterializedAccumulator", "Rule",
           "register_rule", "rule_for", "sumsq", "FALLBACK", "FallbackRule", "functional",
           "per_example", "layer_table"]


def _summary(cls) -> str:
    """The first paragraph of a class docstring, on one line."""
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())


def layer_table() -> str:
    """The registered rules as a Markdown table (the README and docs are generated from it)."""
    rows = ["| module type | rule | how |", "|---|---|---|"]
    for t, rule in RULES.items():
        doc = _summary(type(rule))
        name = f"nn.{t.__name__}" if t.__module__.startswith("torch.nn") else t.__qualname__
        rows.append(f"| `{name}` | `{type(rule).__name__}` | {doc} |")
    rows.append(f"| anything else | `FallbackRule` | {_summary(FallbackRule)} |")
    return "\n".join(rows)

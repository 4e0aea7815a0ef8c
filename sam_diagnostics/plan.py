"""The plan: which module computes which parameters' per-example quantities, with which rule,
and along which batch axis.

* :func:`make_plan` — the per-layer plan: a module whose exact type has a rule, whose trainable
  parameters are all ones that rule knows, and which carries no hooks of its own, gets that
  rule; any other module owning trainable parameters gets the torch.func fallback over its
  subtree. Parameters owned by the root, parameters shared by two entries (tied weights) or
  dropout inside a fallback subtree in train mode cannot be exact per layer: the plan is then
  the exact one.
* :func:`exact_plan` — the whole model as one fallback entry: the exact engine.
* :func:`batch_axes` — establishes the batch axis of every hooked input and output by running
  the model on 2 and on 3 examples and seeing which dimension follows the batch (never guessed
  from a size that happens to equal ``B``). A rule entry whose input or output is not batch-first
  becomes a fallback entry along the axes found.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import NotFastError
from .rules import FALLBACK, Call, Entry, functional, rule_for

__all__ = ["Plan", "make_plan", "exact_plan", "batch_axes", "LOOP_MODULES"]

#: Module types without ``vmap`` batching rules: their fallback runs a per-example loop.
LOOP_MODULES: tuple[type, ...] = (nn.RNNBase,)


def _needs_loop(m: nn.Module) -> bool:
    """No exact ``vmap``: recurrent layers (no batching rule) and ``nn.Embedding`` with
    ``padding_idx`` (with per-example weights, vmap's embedding rule drops the zero gradient of
    the padding row)."""
    return isinstance(m, LOOP_MODULES) or (isinstance(m, nn.Embedding)
                                           and m.padding_idx is not None)


@dataclass
class Plan:
    """Entries covering every trainable parameter exactly once.

    ``block_of`` maps a parameter's full name to its block (the per-layer entry that owns it:
    a module name, the same for every method). ``whole`` marks the exact plan; ``reason`` says
    why the per-layer plan could not be used (or ``None``).
    """

    entries: dict[str, Entry]
    block_of: dict[str, str]
    whole: bool = False
    reason: str | None = None
    example_size: int = 0  # the largest hooked output's elements per example (0: unknown)
    copy_calls: bool = False  # an in-place op changes recorded tensors: passes copy them

    def with_dims(self, dims: dict[str, list], example_size: int = 0) -> Plan:
        """The plan with the batch axes found by :func:`batch_axes`; rule entries whose calls
        are not batch-first become fallback entries along those axes."""
        entries = {}
        for name, e in self.entries.items():
            d = dims[name]
            if not e.rule.subtree and any(
                    ins[0] != 0 or out != 0 for ins, out in d):
                e = _fallback_entry(name, e.module)
            entries[name] = Entry(e.name, e.module, e.rule, e.params, e.fn, e.loop, d)
        return Plan(entries, self.block_of, self.whole, self.reason, example_size)


def _loop(module: nn.Module) -> bool:
    return any(_needs_loop(m) for m in module.modules())


def _fallback_entry(name: str, module: nn.Module, output_fn=None) -> Entry:
    fn, params = functional(module, output_fn)
    return Entry(name, module, FALLBACK, params, fn, _loop(module))


def _own(module: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}


def _visit(model: nn.Module) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        own = _own(module)
        if own:
            rule = rule_for(module)
            hooked = bool(module._forward_hooks or module._forward_pre_hooks)
            if (rule is not None and rule.covers(module) and set(own) <= set(rule.params)
                    and not hooked):
                entries[prefix] = Entry(prefix, module, rule, own)
            else:
                entries[prefix] = _fallback_entry(prefix, module)
                return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return entries


def _blocks(entries: dict[str, Entry]) -> dict[str, str]:
    return {e.full(n): name for name, e in entries.items() for n in e.params}


def exact_plan(model: nn.Module, output_fn=None, reason: str | None = None) -> Plan:
    """The whole model as one fallback entry (torch.func; a per-example loop where needed)."""
    entry = _fallback_entry("", model, output_fn)
    entry.dims = [((0,), 0)]
    return Plan({"": entry}, _blocks(_visit(model)), whole=True, reason=reason)


def make_plan(model: nn.Module, output_fn=None) -> Plan:
    """The per-layer plan, or the exact plan (with its ``reason``) where none can be exact."""
    entries = _visit(model)
    blocks = _blocks(entries)
    reason = None
    owner: dict[int, str] = {}
    for name, e in entries.items():
        for pname, p in e.params.items():
            if id(p) in owner and owner[id(p)] != name:
                reason = (f"parameter {e.full(pname)} is shared with module {owner[id(p)]!r} "
                          "(tied weights)")
            owner[id(p)] = name
    if "" in entries:
        reason = "the root module owns trainable parameters (used in its own forward)"
    for name, e in entries.items():
        if e.rule.subtree and any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training
                                  and m.p > 0 for m in e.module.modules()):
            reason = (f"module {name!r} (torch.func fallback) contains active dropout: its "
                      "recomputation cannot reproduce the forward's random mask")
    if reason is not None:
        plan = exact_plan(model, output_fn, reason)
        plan.block_of = blocks
        return plan
    return Plan(entries, blocks)


def _axis(s2: torch.Size | None, s3: torch.Size | None):
    """The batch axis from a tensor's shapes with 2 and with 3 examples (None: shared)."""
    if s2 is None or s2 == s3:
        return None
    if len(s2) != len(s3):
        raise NotFastError("a hooked tensor's rank depends on the batch size")
    diff = [d for d, (a, b) in enumerate(zip(s2, s3)) if a != b]
    if len(diff) != 1 or (s2[diff[0]], s3[diff[0]]) != (2, 3):
        raise NotFastError("a hooked tensor mixes the batch with another dimension "
                           f"(shapes {tuple(s2)} and {tuple(s3)} for 2 and 3 examples)")
    return diff[0]


def batch_axes(model: nn.Module, plan: Plan, inputs: Tensor, call_model):
    """``({entry: [(in_dims, out_dim) per call]}, the largest hooked output's elements per
    example)`` from two small forwards (2 and 3 examples).

    Raises :class:`NotFastError` when an entry's calls differ between the two forwards or a
    tensor's batch axis cannot be established.
    """
    shapes: dict[int, dict[str, list]] = {2: {}, 3: {}}
    handles = []

    def hook(name, n):
        def h(mod, args, kwargs, out):
            flat = list(args) + list(kwargs.values())
            shapes[n][name].append(([t.shape if isinstance(t, Tensor) else None for t in flat],
                                    out.shape if isinstance(out, Tensor) else None))
        return h

    for n in (2, 3):
        shapes[n] = {name: [] for name in plan.entries}
        try:
            for name, e in plan.entries.items():
                handles.append(e.module.register_forward_hook(hook(name, n), with_kwargs=True))
            with torch.no_grad():
                call_model(inputs[[0] * n])
        finally:
            for h in handles:
                h.remove()
            handles.clear()
    out: dict[str, list] = {}
    size = 1
    for name in plan.entries:
        c2, c3 = shapes[2][name], shapes[3][name]
        if len(c2) != len(c3):
            raise NotFastError(f"module {name!r} runs a different number of times for 2 and 3 "
                               "examples")
        dims = []
        for (i2, o2), (i3, o3) in zip(c2, c3):
            if o2 is None:
                raise NotFastError(f"module {name!r} returns a non-tensor")
            out_dim = _axis(o2, o3)
            if out_dim is None:
                raise NotFastError(f"the output of module {name!r} has no batch dimension")
            dims.append((tuple(_axis(a, b) for a, b in zip(i2, i3)), out_dim))
            size = max(size, o3.numel() - o2.numel())
        out[name] = dims
    return out, size


def record_call(entry: Entry, index: int, args, kwargs, out) -> Call:
    """A :class:`Call` with the batch axes the plan established for call number ``index``."""
    if index >= len(entry.dims):
        raise NotFastError(f"module {entry.name!r} ran more often than when the plan was made")
    in_dims, out_dim = entry.dims[index]
    return Call(args, kwargs, out, in_dims, out_dim)

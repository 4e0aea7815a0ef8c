"""Forward hooks: which modules get which rule (the plan), capturing their calls, and the guard
that keeps the model exactly as it was while measuring.

Hooks are always removed, also when the forward raises. Hooks know which pass they are in: a
:class:`Capture` either records the pass at ``w`` or, given per-example parameter offsets,
evaluates the pass at ``w + ε_i`` (the SAM view) and records that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .rules import FALLBACK, NotFastError, Rule, rule_for, trainable

__all__ = ["Plan", "make_plan", "Capture", "capture_inputs", "measuring", "check_per_example",
           "traced"]


@dataclass
class Plan:
    """Which module computes which parameters' per-example quantities.

    ``entries`` maps a module name to ``(module, rule)``; together they cover every trainable
    parameter exactly once. ``problem`` says why the per-layer path cannot be exact for this
    model (then the torch.func path is used), or is ``None``.
    """

    entries: dict[str, tuple[nn.Module, Rule]]
    problem: str | None = None

    def block_of(self) -> dict[str, str]:
        """Full parameter name -> the plan entry (block) that owns it."""
        out = {}
        for name, (module, rule) in self.entries.items():
            rec = rule is FALLBACK
            for pname in trainable(module, recurse=rec):
                out[f"{name}.{pname}" if name else pname] = name
        return out


def make_plan(model: nn.Module) -> Plan:
    """Assign a rule to every module that owns trainable parameters.

    A module with a registered rule handles its own parameters; any other module owning
    trainable parameters is handled by the torch.func fallback, which then covers its whole
    subtree. Parameters shared by two entries (tied weights) make the plan inexact.
    """
    entries: dict[str, tuple[nn.Module, Rule]] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        own = trainable(module)
        rule = rule_for(module)
        if own:
            entries[prefix] = (module, rule if rule is not None else FALLBACK)
            if rule is None:
                return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    owner: dict[int, str] = {}
    problem = None
    for name, (module, rule) in entries.items():
        for pname, p in trainable(module, recurse=rule is FALLBACK).items():
            if id(p) in owner and owner[id(p)] != name:
                problem = (f"parameter {name}.{pname} is shared with module {owner[id(p)]!r} "
                           "(tied weights)")
            owner[id(p)] = name
    return Plan(entries, problem)


@dataclass
class _Record:
    calls: list = field(default_factory=list)  # (args, kwargs), detached
    outputs: list = field(default_factory=list)  # output tensors, in the graph


def _detach(x):
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


class Capture:
    """Context manager recording every call of the plan's modules during one forward.

    Parameters
    ----------
    plan : Plan
    offsets : dict, optional
        ``{entry name: state}`` from :meth:`Rule.prepare`; the hooked modules then compute their
        output at the per-example parameters ``θ + Δ_i`` (the SAM view), and that is recorded.
    record : bool
        Keep the calls (for norms and cotangents); ``False`` only applies ``offsets``.
    inputs : Tensor, optional
        The model input as returned by :func:`traced`. Then every recorded call is checked to
        receive per-example inputs (a batch dimension that comes from the model input, not a
        constant such as ``pos_emb(torch.arange(L))``); otherwise ``NotFastError`` is raised and
        the caller falls back to torch.func.
    """

    def __init__(self, plan: Plan, offsets: dict | None = None, record: bool = True,
                 inputs: Tensor | None = None):
        self.plan = plan
        self.offsets = offsets or {}
        self.record = record
        self.inputs = inputs
        self.records: dict[str, _Record] = {name: _Record() for name in plan.entries}
        self._handles: list = []
        self._inside = False

    def _hook(self, name: str, module: nn.Module, rule: Rule):
        def hook(mod, args, kwargs, out):
            if self._inside:
                return None
            if not isinstance(out, Tensor):
                raise NotFastError(f"module {name!r} returns {type(out).__name__}, not a tensor")
            if name in self.offsets:
                self._inside = True
                try:
                    out = rule.apply(module, self.offsets[name], (args, kwargs), out)
                finally:
                    self._inside = False
            if not self.record:
                return out
            if self.inputs is not None:
                self._check_per_example(name, args, kwargs, rule)
            rec = self.records[name]
            rec.calls.append((_detach(args), _detach(kwargs)))
            rec.outputs.append(out)
            return out.clone()  # later in-place ops must not change the recorded output

        return hook

    def busy(self) -> bool:
        """True while a rule evaluates a module itself (other hooks should ignore that call)."""
        return self._inside

    def _check_per_example(self, name: str, args, kwargs, rule: Rule) -> None:
        x = self.inputs
        B = x.shape[0]
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
        if rule is not FALLBACK:
            tensors = tensors[:1]  # rules read the first input only
        for t in tensors:
            if rule is FALLBACK and (t.dim() == 0 or t.shape[0] != B):
                continue  # the fallback treats it as shared by all examples
            if t.dim() == 0 or t.shape[0] != B or not _per_example(t, x):
                raise NotFastError(
                    f"an input of module {name!r} is not per-example (no batch dimension, or "
                    "not computed from the model input, e.g. pos_emb(torch.arange(L)))")

    def __enter__(self) -> Capture:
        try:
            for name, (module, rule) in self.plan.entries.items():
                self._handles.append(
                    module.register_forward_hook(self._hook(name, module, rule), with_kwargs=True)
                )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def cotangents(self, logits: Tensor, directions: Tensor):
        """Output cotangents of every recorded call for ``K`` cotangent directions at the logits.

        ``directions`` has shape ``[K, *logits.shape]``; returns ``{entry: [[K, B, *out] per
        call]}``. Only input-gradients are computed (no parameter gradients).
        """
        names, outs = [], []
        for name, rec in self.records.items():
            for o in rec.outputs:
                names.append(name)
                outs.append(o)
        result: dict[str, list[Tensor]] = {name: [] for name in self.records}
        if not outs:
            return result
        kw = dict(retain_graph=True, allow_unused=True, materialize_grads=True)
        if logits.is_cuda:  # one vmapped backward: fewer kernel launches
            grads = torch.autograd.grad(logits, outs, grad_outputs=directions.contiguous(),
                                        is_grads_batched=True, **kw)
        elif directions.shape[0] == 1:
            grads = [g[None] for g in torch.autograd.grad(logits, outs, grad_outputs=directions[0],
                                                          **kw)]
        else:  # on CPU K plain backward passes measured faster than the vmapped one
            per_dir = [torch.autograd.grad(logits, outs, grad_outputs=d, **kw)
                       for d in directions]
            grads = [torch.stack(gs) for gs in zip(*per_dir)]
        for name, g in zip(names, grads):
            result[name].append(g)
        return result

    def check_all_fired(self, logits: Tensor) -> None:
        """Raise :class:`NotFastError` if a parameter of a module that never ran still affects
        the logits (it is used outside its module's forward, e.g. ``F.linear(h, emb.weight)``)."""
        silent = []
        for name, rec in self.records.items():
            if not rec.calls:
                module, rule = self.plan.entries[name]
                silent += list(trainable(module, recurse=rule is FALLBACK).values())
        if silent and logits.requires_grad:
            grads = torch.autograd.grad(logits.sum(), silent, retain_graph=True,
                                        allow_unused=True)
            if any(g is not None for g in grads):
                raise NotFastError("a parameter is used outside its module's forward")

    def sq_norms(self, cots: dict[str, list[Tensor]]) -> dict[str, Tensor]:
        """Per-example ``Σ_k ‖g_k‖²`` per plan entry (block), ``{entry: [B]}``."""
        out = {}
        for name, rec in self.records.items():
            if not rec.calls:
                continue
            module, rule = self.plan.entries[name]
            parts = rule.sq_norms(module, rec.calls, cots[name], self.offsets.get(name))
            if parts:
                out[name] = sum(parts.values())
        return out

def _per_example(t: Tensor, x: Tensor) -> bool:
    """Whether ``t``'s leading dimension is the batch: a float tensor computed from the (traced)
    model input, an index tensor that is (a view of) the model input, or an index tensor with a
    batch and another dimension (``arange(S).repeat(B, 1)``). A 1-D constant such as
    ``arange(L)`` — broadcast over the batch later — is not, even when ``L == B``."""
    if t.is_floating_point():
        return t.requires_grad
    return t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() or t.dim() >= 2


def traced(inputs: Tensor) -> Tensor:
    """The model input to run a checked :class:`Capture` with: a float input is made to require
    grad so that every tensor computed from it does (an integer input is used as it is)."""
    return inputs.detach().requires_grad_(True) if inputs.is_floating_point() else inputs


@contextlib.contextmanager
def capture_inputs(modules: dict[str, nn.Module], skip=None) -> Iterator[dict[str, list[Tensor]]]:
    """Record the (first positional) input of each named module, in the graph, per call.

    ``skip()`` returning True ignores a call (e.g. :meth:`Capture.busy`: a rule evaluating the
    module inside ``vmap``).

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> with capture_inputs({"2": net[2]}) as acts:
    ...     _ = net(torch.randn(5, 3))
    >>> acts["2"][0].shape
    torch.Size([5, 4])
    """
    store: dict[str, list[Tensor]] = {name: [] for name in modules}
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: None if skip is not None and skip()
                else store[name].append(args[0])
            ))
        yield store
    finally:
        for h in handles:
            h.remove()


def check_per_example(model: nn.Module) -> None:
    """Raise if a module couples the examples of a batch in the current mode (BatchNorm in
    train mode), where per-example quantities are undefined."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                f"module {name!r} is BatchNorm in train mode: it mixes the examples of a batch, "
                "so per-example quantities are undefined. Put it in eval mode (running "
                "statistics) or replace it by GroupNorm/LayerNorm (as the SAM label-noise paper "
                "did)"
            )


@contextlib.contextmanager
def measuring(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluate ``model`` in eval mode and put everything back afterwards.

    Train/eval mode of every module and the global torch RNG state are restored on exit, also
    on exceptions. Dropout is therefore off and BatchNorm uses its running statistics.
    """
    modes = {m: m.training for m in model.modules()}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        model.eval()
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


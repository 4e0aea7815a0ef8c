"""The engine: the one place that calls the model, at ``w`` or at ``w + ε``, with the rules
attached, and hands out what every client needs.

A :class:`Pass` is one forward of a batch under a :class:`~sam_diagnostics.plan.Plan`. It
holds the logits and the watched layers' activation norms, and gives

* :meth:`Pass.sq_norms` — per-example ``Σ_k ‖J_iᵀ v_{k,i}‖²`` per parameter block for any
  cotangent directions ``v`` at the logits (one-hot: the Jacobian norm; the logit term: the
  gradient norm; Rademacher: Hutchinson), streamed one direction at a time;
* :meth:`Pass.offsets` — 1-SAM's per-example ``ε_i = ρ g_i / ‖g_i‖`` in factored form; a
  :class:`Pass` given these offsets evaluates every example at its own ``w + ε_i``;
* :meth:`Pass.grad` — ``Σ_i J_iᵀ c_i`` per parameter (the SAM family's update).

An :class:`Engine` chooses the plan for a model and input signature: the per-layer plan where it
is proven exact for *this* model — structurally (:func:`~sam_diagnostics.plan.make_plan`), by its
batch axes (:func:`~sam_diagnostics.plan.batch_axes`) and numerically (:func:`self_check`, once
per model and input signature, cached) — and otherwise the exact torch.func plan.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import NotFastError
from .hooks import capture_inputs, check_model, frozen_buffers, measuring
from .logit_terms import check_head, per_example_loss
from .perturb import epsilon, perturbed, radius_scale
from .plan import Plan, batch_axes, exact_plan, make_plan, record_call
from .rules import sumsq

__all__ = ["Engine", "Pass", "Offsets", "call_model", "check_inputs", "check_targets",
           "check_loss", "logit_grad", "one_hot_directions", "METHODS"]

METHODS = ("auto", "exact", "fast")


# --------------------------------------------------------------------------- checks and calls
def _model_tensor(model: nn.Module) -> Tensor | None:
    return next(iter(model.parameters()), None)


def check_inputs(inputs, model: nn.Module | None = None) -> None:
    """Inputs a model can be measured on, or a clear error naming the fix."""
    if model is not None:
        check_model(model)
    if isinstance(inputs, Mapping):
        raise TypeError(
            f"inputs must be one torch.Tensor [B, ...], got a {type(inputs).__name__} of "
            f"{', '.join(map(str, list(inputs)[:4]))}: a model called as model(**batch) is "
            "measured through a module whose forward takes one tensor, e.g. "
            "sam_diagnostics.integrations.hf.TextClassifier(model, keys) on "
            "torch.stack([batch[k] for k in keys], 1) for token inputs, or your own small "
            "wrapper that unpacks the tensor into keyword arguments")
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor [B, ...], got {type(inputs).__name__}")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError("empty batch: inputs must have a leading batch dimension of size >= 1")
    # one cheap reduction first; the element-wise test only when the sum is not finite
    if (inputs.is_floating_point() and not torch.isfinite(inputs.sum())
            and not torch.isfinite(inputs).all()):
        raise ValueError("inputs contain NaN or Inf; clean the data before measuring")
    if torch.is_inference_mode_enabled():
        raise ValueError("called inside torch.inference_mode(): per-example gradients need "
                           "autograd; call it outside the inference_mode block")
    p = _model_tensor(model) if model is not None else None
    if p is not None:
        if p.device != inputs.device:
            raise ValueError(f"inputs are on {inputs.device} but the model is on {p.device}; "
                             f"move them with inputs.to({str(p.device)!r})")
        if inputs.is_floating_point() and inputs.dtype != p.dtype:
            raise TypeError(f"inputs are {inputs.dtype} but the model's parameters are "
                            f"{p.dtype}; convert with inputs.to({p.dtype})")


def check_targets(targets, inputs: Tensor) -> None:
    if not isinstance(targets, Tensor) or targets.shape[:1] != inputs.shape[:1]:
        raise ValueError(
            f"targets must be a tensor of shape [B] = [{inputs.shape[0]}] matching inputs, "
            f"got {getattr(targets, 'shape', type(targets))}"
        )


def call_model(model: nn.Module, inputs: Tensor, output_fn=None) -> Tensor:
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


def logit_grad(loss_fn, logits: Tensor, targets: Tensor) -> Tensor:
    """``δ_i = ∂ℓ_i/∂z_i`` as a constant (per example, unscaled), the loss checked."""
    if loss_fn is per_example_loss:
        check_head(logits.detach(), targets)
    with torch.enable_grad():  # in float32 or better (bf16/fp16 logits under autocast)
        z = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
        loss = loss_fn(z.requires_grad_(True), targets)
        check_loss(loss, z)
        (d,) = torch.autograd.grad(loss.sum(), z)
    return d


def check_loss(loss, logits: Tensor) -> None:
    """``loss_fn`` returned per-example losses ``[B]``."""
    if not isinstance(loss, Tensor) or loss.shape != logits.shape[:1]:
        raise ValueError(
            f"loss_fn must return per-example losses of shape [B] = [{logits.shape[0]}], got "
            f"{getattr(loss, 'shape', type(loss))}; e.g. functools.partial(F.cross_entropy, "
            "reduction='none')")


def one_hot_directions(logits: Tensor) -> Tensor:
    """The ``C`` one-hot cotangents, ``[C, B, C]`` (``[1, B]`` for a binary head)."""
    if logits.dim() == 1:
        return torch.ones_like(logits)[None]
    C = logits.shape[1]
    eye = torch.eye(C, dtype=logits.dtype, device=logits.device)
    return eye[:, None, :].expand(C, logits.shape[0], C)


# --------------------------------------------------------------------------- one pass
@dataclass
class Offsets:
    """Per-example parameter offsets ``Δ_i`` for the entries of one plan (``{entry: state}``)."""

    plan: Plan
    states: dict


def _clone(x):
    if isinstance(x, Tensor):
        return x.clone()
    if isinstance(x, tuple):
        return tuple(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _detach(x):
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


class Pass:
    """One forward of ``inputs`` under ``plan`` (at ``w``, or at ``w + Δ_i`` given ``offsets``).

    Attributes
    ----------
    logits : Tensor
        ``[B, C]`` or ``[B]``, in the autograd graph (unless ``graph=False``).
    acts : dict
        Per-example input norms ``{name: [B]}`` of the ``watch`` modules.
    """

    def __init__(self, model: nn.Module, plan: Plan, inputs: Tensor, *, output_fn=None,
                 offsets: Offsets | None = None, watch: dict[str, nn.Module] | None = None,
                 graph: bool = True):
        if offsets is not None and offsets.plan is not plan:
            raise ValueError("offsets were computed under another plan")
        self.model, self.plan, self.output_fn = model, plan, output_fn
        self.states = offsets.states if offsets is not None else {}
        self.records: dict[str, list] = {name: [] for name in plan.entries}
        self._busy = False
        watch = watch or {}
        with torch.set_grad_enabled(graph):
            if plan.whole:
                self._run_whole(inputs, watch)
            else:
                self._run_hooked(inputs, watch)

    def _run_whole(self, x: Tensor, watch) -> None:
        entry = self.plan.entries[""]
        call = record_call(entry, 0, (x,), {}, None)
        if "" in self.states:
            self.logits, self.acts = entry.rule.apply(entry, self.states[""], call, watch)
            self._check_acts(watch)
        else:
            with capture_inputs(watch) as raw:
                self.logits = call_model(self.model, x, self.output_fn)
            self.acts = _norms(raw)
        call.out = self.logits
        self.records[""].append(call)

    def _check_acts(self, watch) -> None:
        missing = [n for n in watch if n not in self.acts]
        if missing:
            raise ValueError(f"watched layer(s) {missing} did not run in the forward pass")

    def _hook(self, entry, inside: dict, acts: dict):
        def hook(mod, args, kwargs, out):
            if self._busy:
                return None
            if not isinstance(out, Tensor):
                raise NotFastError(f"module {entry.name!r} returns {type(out).__name__}")
            calls = self.records[entry.name]
            call = record_call(entry, len(calls), args, kwargs, out)  # inputs in the graph
            if entry.name in self.states:
                self._busy = True
                try:
                    if entry.rule.subtree:
                        out, norms = entry.rule.apply(entry, self.states[entry.name], call,
                                                      inside)
                        for n, v in norms.items():
                            acts[n] = (acts[n].square() + v.square()).sqrt() if n in acts else v
                    else:
                        out = entry.rule.apply(entry, self.states[entry.name], call)
                finally:
                    self._busy = False
            ret = out
            if self._safe:  # copies: an in-place op later in the forward changed them once
                args, kwargs, ret = _clone(args), _clone(kwargs), out.clone()
            else:
                self._versions += [(t, t._version) for t in (*args, out)
                                   if isinstance(t, Tensor)]
            call.args, call.kwargs, call.out = _detach(args), _detach(kwargs), out
            calls.append(call)
            return ret

        return hook

    def _run_hooked(self, x: Tensor, watch) -> None:
        """The forward with the plan's hooks. Recorded inputs and outputs are not copied; if an
        in-place op later in the forward changed one (``ReLU(inplace=True)``), the pass runs
        again with copies, and the plan remembers to copy from then on."""
        self._safe = self.plan.copy_calls
        self._versions: list = []
        self._forward(x, watch)
        if not self._safe and any(t._version != v for t, v in self._versions):
            self.plan.copy_calls = self._safe = True
            self.records = {name: [] for name in self.plan.entries}
            self._forward(x, watch)
        self._versions = []

    def _forward(self, x: Tensor, watch) -> None:
        handles, inner = [], {}
        try:
            for name, entry in self.plan.entries.items():
                inside = {}
                if entry.rule.subtree and name in self.states:
                    sub = set(entry.module.modules())
                    inside = {n: m for n, m in watch.items() if m in sub}
                handles.append(entry.module.register_forward_hook(
                    self._hook(entry, inside, inner), with_kwargs=True))
            with capture_inputs(watch, skip=lambda: self._busy) as raw:
                self.logits = call_model(self.model, x, self.output_fn)
        finally:
            for h in handles:
                h.remove()
        self.acts = {**_norms({n: v for n, v in raw.items() if n not in inner}), **inner}
        self._check_acts(watch)

    # ------------------------------------------------------------------ cotangents
    def _outs(self):
        return [(name, c.out) for name, calls in self.records.items() for c in calls]

    def cotangents(self, directions: Tensor) -> Iterable[dict[str, list[Tensor]]]:
        """For each direction ``v_k`` (``directions [K, *logits]``), the output cotangents of
        every recorded call, ``{entry: [per call]}`` (input gradients only)."""
        pairs = self._outs()
        if self.plan.whole:
            for d in directions:
                yield {"": [d]}
            return
        kw = dict(retain_graph=True, allow_unused=True, materialize_grads=True)
        outs = [o for _, o in pairs]
        if self.logits.is_cuda and directions.shape[0] > 1:  # one vmapped backward
            grads = torch.autograd.grad(self.logits, outs, grad_outputs=directions.contiguous(),
                                        is_grads_batched=True, **kw)
            per_dir = [[g[k] for g in grads] for k in range(directions.shape[0])]
        else:
            per_dir = (torch.autograd.grad(self.logits, outs, grad_outputs=d, **kw)
                       for d in directions)
        for gs in per_dir:
            out: dict[str, list[Tensor]] = {name: [] for name in self.records}
            for (name, _), g in zip(pairs, gs):
                out[name].append(g)
            yield out

    def _accumulate(self, directions: Tensor) -> dict:
        accs = {name: e.rule.accumulator(e, self.records[name], self.states.get(name))
                for name, e in self.plan.entries.items() if self.records[name]}
        for cots in self.cotangents(directions):
            for name, acc in accs.items():
                acc.add(cots[name])
        return accs

    def _blocks(self, accs: dict) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, acc in accs.items():
            entry = self.plan.entries[name]
            for pname, v in acc.result().items():
                b = self.plan.block_of[entry.full(pname)]
                out[b] = out[b] + v if b in out else v
        return out

    # ------------------------------------------------------------------ quantities
    def sq_norms(self, directions: Tensor) -> dict[str, Tensor]:
        """Per-example ``Σ_k ‖J_iᵀ v_{k,i}‖²`` per block, ``{block: [B]}``."""
        return self._blocks(self._accumulate(directions))

    def offsets(self, direction: Tensor, rho: float) -> tuple[dict[str, Tensor], Offsets]:
        """1-SAM's ``ε_i = ρ g_i / ‖g_i‖`` with ``g_i = J_iᵀ direction_i``, factored.

        Returns ``({block: ‖g_i‖² restricted to the block}, offsets)``.
        """
        accs = self._accumulate(direction[None])
        sq = self._blocks(accs)
        total = sum(sq.values()) if sq else self.logits.new_zeros(self.logits.shape[0])
        scale = radius_scale(rho, total.sqrt())
        return sq, Offsets(self.plan, {name: acc.offsets(scale) for name, acc in accs.items()})

    def per_example_grads(self, direction: Tensor) -> dict[str, Tensor]:
        """``{param name: [B, *shape]}`` (the exact plan only: it materializes them)."""
        if not self.plan.whole:
            raise NotFastError("materialized per-example gradients need the exact plan")
        acc = self._accumulate(direction[None])[""]
        return acc.grads()

    def adaptive_offsets(self, direction: Tensor, rho: float,
                         params: dict[str, Tensor]) -> tuple[dict[str, Tensor], Offsets]:
        """ASAM's per-example ``ε_i = ρ T² g_i / ‖T g_i‖`` (``T = |w|``), materialized."""
        g = self.per_example_grads(direction)
        sq = {}
        for n, v in g.items():
            b = self.plan.block_of[n]
            s = sumsq(v.reshape(v.shape[0], -1), 1)
            sq[b] = sq[b] + s if b in sq else s
        return sq, Offsets(self.plan, {"": epsilon(g, rho, params, True, lead=1)})

    def grad(self, cot: Tensor) -> dict[str, Tensor]:
        """``Σ_i J_iᵀ cot_i`` for every trainable parameter ``{name: tensor}``."""
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        g = torch.autograd.grad(self.logits, list(params.values()), grad_outputs=cot,
                                retain_graph=True, allow_unused=True, materialize_grads=True)
        return dict(zip(params, g))


def _norms(raw: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    """Per-example L2 norm of each watched module's input (all calls concatenated), ``[B]``."""
    out = {}
    for name, calls in raw.items():
        if calls:
            out[name] = torch.cat([c.reshape(c.shape[0], -1) for c in calls], dim=1).norm(dim=1)
    return out


# --------------------------------------------------------------------------- the engine
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: Default memory budget per pass: elements of the largest activation of one chunk of examples.
CHUNK_ELEMENTS = {"cpu": 2**19, "cuda": 2**24}


def signature(model: nn.Module, inputs: Tensor, output_fn) -> tuple:
    """What a verified plan depends on: structure, modes, parameters, input shape and dtype."""
    mods = tuple((n, type(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks))
                 for n, m in model.named_modules())
    params = tuple((n, id(p), p.requires_grad, p.dtype)
                   for n, p in model.named_parameters(remove_duplicate=False))
    return mods, params, tuple(inputs.shape), inputs.dtype, inputs.device, id(output_fn)


def self_check(model: nn.Module, plan: Plan, inputs: Tensor, output_fn=None) -> None:
    """Compare the per-layer plan with single-example autograd; raise NotFastError if they
    differ.

    For a random direction ``v`` at the logits: the per-example squared gradient norm of every
    block for the first and the last example, and those examples' logits at their own
    ``w + ε_i`` (the SAM view). Cost: one forward and one backward of the batch, two
    single-example forward/backward passes and one perturbed forward.
    """
    B = inputs.shape[0]
    g = torch.Generator().manual_seed(0)
    p = Pass(model, plan, inputs, output_fn=output_fn)
    v = torch.randn(p.logits.shape, generator=g, dtype=p.logits.dtype).to(p.logits.device)
    sq, off = p.offsets(v, rho=0.1)
    at_eps = Pass(model, plan, inputs, output_fn=output_fn, offsets=off, graph=False).logits
    params = {n: q for n, q in model.named_parameters() if q.requires_grad}
    tol = {torch.float64: 1e-7, torch.float32: 2e-3}.get(p.logits.dtype, 0.15)  # bf16/fp16
    for i in sorted({0, B - 1}):
        x = inputs[i:i + 1]
        with torch.enable_grad():
            z = call_model(model, x, output_fn)
            grads = torch.autograd.grad((z * v[i:i + 1]).sum(), list(params.values()),
                                        allow_unused=True, materialize_grads=True)
        ref: dict[str, Tensor] = {}
        for n, gv in zip(params, grads):
            b = plan.block_of[n]
            ref[b] = ref[b] + gv.pow(2).sum() if b in ref else gv.pow(2).sum()
        scale = float(sum(ref.values()))
        for b in set(ref) | set(sq):
            got = sq[b][i] if b in sq else torch.zeros(())
            want = ref.get(b, torch.zeros(()))
            if abs(float(got) - float(want)) > tol * scale + 1e-30:
                raise NotFastError(f"self-check: the per-layer gradient norm of block {b!r} "
                                   f"differs from autograd for example {i} ({float(got):.6g} vs "
                                   f"{float(want):.6g})")
        c = float(radius_scale(0.1, torch.tensor(scale).sqrt()))
        with torch.no_grad(), perturbed(model, {n: c * gv for n, gv in zip(params, grads)}):
            want_z = call_model(model, x, output_fn)[0]
        err = float((at_eps[i] - want_z).abs().max())
        if err > tol * (1 + float(want_z.abs().max())):
            raise NotFastError(f"self-check: the per-layer SAM view of example {i} differs from "
                               f"autograd by {err:.3g}")


class Engine:
    """Chooses, verifies and caches the plan for a model, and runs passes under it.

    Parameters
    ----------
    model : nn.Module
    output_fn : callable, optional
        Picks the logits from the model's output.
    method : {"auto", "fast", "exact"}
        ``"auto"``: the per-layer plan where it is proven exact for this model and input
        signature, else the exact plan (one warning when only the numeric check caught it);
        ``"fast"``: the per-layer plan or a ``ValueError``; ``"exact"``: torch.func throughout.
    loss_fn : callable, optional
        ``loss_fn(logits, targets) -> [B]`` (default: cross-entropy / logistic).
    chunk_elements : int, optional
        Memory budget: passes run on chunks of examples whose largest activation has about
        this many elements (default ``2**19`` on CPU, where the per-example work is bound by
        memory traffic, and ``2**24`` on CUDA). Exact: the examples are independent.
    """

    def __init__(self, model: nn.Module, *, output_fn=None, method: str = "auto", loss_fn=None,
                 chunk_elements: int | None = None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        check_model(model)
        self.model, self.output_fn, self.method = model, output_fn, method
        self.loss_fn = loss_fn or per_example_loss
        if chunk_elements is None:
            p = next(iter(model.parameters()), None)
            chunk_elements = CHUNK_ELEMENTS["cuda" if p is not None and p.is_cuda else "cpu"]
        self.chunk_elements = int(chunk_elements)

    def params(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def _refuse_fast(self, reason: str):
        return ValueError(f"method='fast' cannot be exact for this model: {reason}; use "
                          "method='exact' or 'auto'")

    def plan(self, inputs: Tensor) -> Plan:
        """The plan for ``inputs``' signature (verified once, then cached)."""
        model = self.model
        if self.method == "exact":
            return exact_plan(model, self.output_fn)
        cache = _PLANS.setdefault(model, {})
        sig = signature(model, inputs, self.output_fn)
        plan = cache.get(sig)
        if plan is None:
            plan = self._verified(inputs)
            cache[sig] = plan
        if plan.whole and self.method == "fast":
            raise self._refuse_fast(plan.reason)
        return plan

    def _verified(self, inputs: Tensor) -> Plan:
        model = self.model
        plan = make_plan(model, self.output_fn)
        if plan.whole:
            return plan
        numeric = False
        try:
            with measuring(model), frozen_buffers(model):
                plan = plan.with_dims(*batch_axes(
                    model, plan, inputs, lambda x: call_model(model, x, self.output_fn)))
                numeric = True
                self_check(model, plan, inputs[self.chunks(plan, inputs.shape[0])[0]],
                           self.output_fn)
        except NotFastError as err:
            if numeric and self.method == "auto":
                warnings.warn(f"sam_diagnostics: {err}; using the exact torch.func path for "
                              f"{type(model).__name__}", RuntimeWarning, stacklevel=4)
            return exact_plan(model, self.output_fn, reason=str(err))
        return plan

    def chunks(self, plan: Plan, batch: int, multiple: int = 1) -> list[slice]:
        """Consecutive chunks of examples whose largest activation stays near the memory
        budget ``chunk_elements`` (a multiple of ``multiple`` examples each)."""
        if not plan.example_size:
            return [slice(0, batch)]
        n = max(1, self.chunk_elements // plan.example_size)
        n = max(multiple, n // multiple * multiple)
        return [slice(s, min(s + n, batch)) for s in range(0, batch, n)]

    def run(self, plan: Plan, inputs: Tensor, **kw) -> Pass:
        """One :class:`Pass` of ``inputs`` under ``plan``."""
        return Pass(self.model, plan, inputs, output_fn=self.output_fn, **kw)

    def per_chunk(self, inputs: Tensor, fn: Callable[[Plan, slice], object],
                  multiple: int = 1) -> list:
        """``[fn(plan, chunk) for each chunk]`` (see :meth:`chunks`) under :meth:`attempt`."""
        B = inputs.shape[0]
        return self.attempt(inputs, lambda plan: [fn(plan, s)
                                                  for s in self.chunks(plan, B, multiple)])

    def attempt(self, inputs: Tensor, fn: Callable[[Plan], object]):
        """``fn(plan)`` under the verified plan; if a pass finds the per-layer plan inexact
        after all (:class:`NotFastError`), ``fn(exact plan)`` — or a ``ValueError`` for
        ``method="fast"``."""
        plan = self.plan(inputs)
        if not plan.whole:
            try:
                return fn(plan)
            except NotFastError as err:
                if self.method == "fast":
                    raise self._refuse_fast(str(err)) from err
                plan = exact_plan(self.model, self.output_fn, reason=str(err))
        return fn(plan)

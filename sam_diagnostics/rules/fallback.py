"""The general fallback: torch.func per-example VJPs over a module's whole subtree.

Exact for any module whose examples are independent along the batch axes the plan established
(inputs with no batch axis are shared by all examples). Memory ``O(B × K × subtree parameters)``
in chunks — the reason the per-layer rules exist. Modules without ``vmap`` batching rules
(``nn.RNN``/``nn.LSTM``/``nn.GRU``) run as a per-example Python loop instead (``entry.loop``).
The whole model as one fallback entry is the library's exact engine (``method="exact"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from ..hooks import capture_inputs, kept_attributes
from .base import CHUNK_ELEMENTS, Accumulator, Call, Entry, Rule, sumsq

__all__ = ["FallbackRule", "FALLBACK", "functional", "per_example"]


def functional(module: nn.Module, output_fn=None):
    """``(fn, params)``: ``fn(params, args, kwargs)`` evaluates ``module`` at ``params``.

    ``params`` holds the module's trainable parameters by their first name. Every *path* to a
    parameter is substituted (tied weights: ``head.weight`` and ``emb.weight`` get the same
    tensor), but each (module, attribute) pair only once, so a block reachable under two names
    is swapped and restored exactly once (``torch.func.functional_call``'s own tying would swap
    it twice and restore it in the wrong order).
    """
    first: dict[int, str] = {}
    params: dict[str, Tensor] = {}
    for n, p in module.named_parameters():
        if p.requires_grad:
            first[id(p)] = n
            params[n] = p
    paths: dict[str, str] = {}
    for mname, m in module.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in first:
                paths[f"{mname}.{pname}" if mname else pname] = first[id(p)]

    def fn(p: dict[str, Tensor], args, kwargs):
        out = functional_call(module, {path: p[n] for path, n in paths.items()}, tuple(args),
                              kwargs, strict=False, tie_weights=False)
        return output_fn(out) if output_fn is not None else out

    return fn, params


def _index(a, d, i):
    if d is None or a is None:
        return a
    if isinstance(a, dict):
        return {k: v.select(d, i) for k, v in a.items()}
    return a.select(d, i)


def _stack(items: list, dim):
    first = items[0]
    if isinstance(first, dict):
        return {k: _stack([it[k] for it in items], dim) for k in first}
    if isinstance(first, tuple):
        dims = dim if isinstance(dim, tuple) else (dim,) * len(first)
        return tuple(_stack([it[j] for it in items], d) for j, d in enumerate(dims))
    return torch.stack(items, dim)


def per_example(fn: Callable, in_dims: Sequence, args: Sequence, *, loop: bool = False,
                out_dims=0, chunk_size: int | None = None, randomness: str = "error"):
    """``vmap(fn, in_dims, out_dims)(*args)``, or the same as a Python loop over examples."""
    if not loop:
        return vmap(fn, in_dims=tuple(in_dims), out_dims=out_dims, chunk_size=chunk_size,
                    randomness=randomness)(*args)
    B = next((a.shape[d] if isinstance(a, Tensor) else next(iter(a.values())).shape[d])
             for a, d in zip(args, in_dims) if d is not None and a is not None)
    return _stack([fn(*[_index(a, d, i) for a, d in zip(args, in_dims)]) for i in range(B)],
                  out_dims)


def _single(entry: Entry, call: Call, in_dims):
    """The entry as a function of (params, per-example inputs) on one example."""
    n_args, keys = len(call.args), list(call.kwargs)

    def f(p, xs):
        xs = [x.unsqueeze(d) if d is not None and isinstance(x, Tensor) else x
              for x, d in zip(xs, in_dims)]
        out = entry.fn(p, xs[:n_args], dict(zip(keys, xs[n_args:])))
        if not isinstance(out, Tensor):
            raise TypeError(f"module {entry.name!r} returns {type(out).__name__}, not a tensor")
        return out

    return f


class _FallbackAcc(Accumulator):
    """Buffers the directions; per-example VJPs of all of them at :meth:`result`."""

    def __init__(self, rule, entry: Entry, calls, state):
        self.rule, self.entry, self.calls, self.state = rule, entry, calls, state
        self.cots: list[list[Tensor]] = []
        self.total: dict[str, Tensor] = {}
        self.last: dict[str, Tensor] | None = None

    def add(self, cots):
        self.cots.append(list(cots))

    def _flush(self):
        if not self.cots:
            return
        K = len(self.cots)
        B = self.calls[0].out.shape[self.calls[0].out_dim]
        size = B * sum(p.numel() for p in self.entry.params.values())
        step = max(1, CHUNK_ELEMENTS // max(1, size))
        for k0 in range(0, K, step):
            g: dict[str, Tensor] = {}
            for c, call in enumerate(self.calls):
                b = torch.stack([d[c] for d in self.cots[k0:k0 + step]])
                for n, v in self.rule.grads_of(self.entry, call, b, self.state).items():
                    g[n] = g[n] + v if n in g else v
            for n, v in g.items():  # v: [k, B, *shape]
                s = sumsq(v.reshape(v.shape[0], v.shape[1], -1), (0, 2))
                self.total[n] = self.total[n] + s if n in self.total else s
            if K == 1:
                self.last = {n: v[0] for n, v in g.items()}
        self.cots = []

    def result(self):
        self._flush()
        return self.total

    def offsets(self, scale):
        self._flush()
        return {n: g * scale.reshape(-1, *[1] * (g.dim() - 1)).to(g.dtype)
                for n, g in self.last.items()}

    def grads(self) -> dict[str, Tensor]:
        """The per-example gradients ``{name: [B, *shape]}`` of the single direction added."""
        self._flush()
        return self.last


class FallbackRule(Rule):
    """torch.func per-example VJPs over the module's subtree (a per-example loop for recurrent
    layers); SAM view `vmap(functional_call)` at `θ + Δ_i`. The whole model as one such entry is
    `method="exact"`.
    """

    params = ()
    subtree = True

    def accumulator(self, entry, calls, state=None):
        return _FallbackAcc(self, entry, calls, state)

    def grads_of(self, entry: Entry, call: Call, b: Tensor, delta=None) -> dict[str, Tensor]:
        """Per-example gradients ``{name: [K, B, *shape]}`` of one call for ``K`` directions
        ``b [K, *out]`` (at ``θ + Δ_i`` when ``delta`` is given)."""
        in_dims = call.in_dims
        f = _single(entry, call, in_dims)
        base = {n: p.detach() for n, p in entry.params.items()}

        def one(d, b_i, *xs):
            p = base if d is None else {n: base[n] + d[n] for n in base}
            _, pull = vjp(lambda q: f(q, xs), p)
            if entry.loop:
                return _stack([pull(b_i[k].unsqueeze(call.out_dim))[0]
                               for k in range(b_i.shape[0])], 0)
            return vmap(lambda c: pull(c.unsqueeze(call.out_dim))[0])(b_i)

        size = b.shape[0] * sum(p.numel() for p in base.values())
        g = _map(entry, one, (0 if delta is not None else None, 1 + call.out_dim, *in_dims),
                 (delta, b, *call.flat()), 0, size)
        return {n: v.transpose(0, 1) for n, v in g.items()}

    def apply(self, entry: Entry, state, call: Call, watch=None):
        """Output at ``θ + Δ_i`` and, for ``watch`` modules inside the subtree, the per-example
        norms of their inputs ``({name: [B]})``; returns ``(out, norms)``."""
        in_dims = call.in_dims
        f = _single(entry, call, in_dims)
        params = entry.params  # not detached: the output stays differentiable in θ
        watch = watch or {}

        def one(d, *xs):
            p = {n: params[n] + d[n] if n in d else params[n] for n in params}
            with capture_inputs(watch) as acts:
                out = f(p, xs).squeeze(call.out_dim)
            return out, {n: torch.cat([a.reshape(-1) for a in v]).norm()
                         for n, v in acts.items() if v}

        return _map(entry, one, (0, *in_dims), (state, *call.flat()), (call.out_dim, 0),
                    sum(p.numel() for p in params.values()))


def _map(entry: Entry, fn, in_dims, args, out_dims, size: int):
    """:func:`per_example` for an entry, in memory-bounded ``vmap`` chunks of ``size`` elements
    per example. Where ``vmap`` cannot run the subtree (no batching rule, data-dependent
    control flow such as a mask check), the entry switches to the exact per-example loop."""
    chunk = max(1, CHUNK_ELEMENTS // max(1, size))
    with kept_attributes(entry.module):  # e.g. legacy weight_norm's recomputed weight
        if not entry.loop:
            try:
                return per_example(fn, in_dims, args, out_dims=out_dims, chunk_size=chunk,
                                   randomness=entry_randomness(entry))
            except RuntimeError:
                entry.loop = True  # torch.func could not batch it: loop from now on
        return per_example(fn, in_dims, args, loop=True, out_dims=out_dims)


def entry_randomness(entry: Entry) -> str:
    """``vmap`` randomness for the entry: independent per example where dropout is active."""
    active = any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
                 for m in entry.module.modules())
    return "different" if active else "error"


FALLBACK = FallbackRule()

"""``nn.Linear``: ``z = W a + c`` on inputs with any leading dimensions.

Per-example gradient ``Σ_s b_s a_sᵀ`` over positions ``s`` (and over calls, when the module runs
more than once). Plain batches (one position): ghost norm ``‖a_i‖² ‖b_i‖²``. Sequences: the Gram
form ``Σ_{s,t} (a_s·a_t)(b_s·b_t)`` or the materialized gradient, whichever is cheaper.
Perturbation (SPEC 2.2): ``(W + c_i Σ_s b_s a_sᵀ) a' = W a' + c_i Σ_s b_s (a_s · a')``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Accumulator, Call, Entry, Rule, gram_sum, register_rule, sumsq


def _flat(x: Tensor) -> Tensor:
    """``[B, *, F] -> [B, S, F]``."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _positions(calls, cots) -> Tensor:
    """Cotangents of every call side by side as positions, ``[B, S, O]``."""
    return torch.cat([_flat(b) for b in cots], 1) if len(cots) > 1 else _flat(cots[0])


class _LinearAcc(Accumulator):
    def __init__(self, entry: Entry, calls):
        self.entry = entry
        a = [_flat(c.x) for c in calls]
        self.a = torch.cat(a, 1) if len(a) > 1 else a[0]  # [B, S, I]
        self.calls = calls
        self.w = "weight" in entry.params
        self.bias = "bias" in entry.params
        B, S, I = self.a.shape
        O = entry.module.out_features
        self.gram = S > 1 and S * (I + O) <= I * O
        self.b2 = self.bb = self.gw = self.gbias = None
        self.last = None
        if self.w and S == 1:
            self.a2 = sumsq(self.a[:, 0], -1)
        elif self.w and self.gram:
            self.ga = self.a @ self.a.transpose(1, 2)

    def add(self, cots):
        b = _positions(self.calls, cots)  # [B, S, O]
        self.last = b
        S = b.shape[1]
        if self.w:
            if S == 1:
                s = sumsq(b[:, 0], -1)
                self.b2 = s if self.b2 is None else self.b2 + s
            elif self.gram:
                g = b @ b.transpose(1, 2)
                self.bb = g if self.bb is None else self.bb.add_(g)
            else:
                s = sumsq(b.transpose(1, 2) @ self.a, (1, 2))
                self.gw = s if self.gw is None else self.gw + s
        if self.bias:
            s = sumsq(b.sum(1), -1)
            self.gbias = s if self.gbias is None else self.gbias + s

    def result(self):
        out = {}
        if self.w:
            S = self.a.shape[1]
            if S == 1:
                out["weight"] = self.a2 * self.b2
            elif self.gram:
                out["weight"] = gram_sum(self.ga, self.bb, (1, 2))
            else:
                out["weight"] = self.gw
        if self.bias:
            out["bias"] = self.gbias
        return out

    def offsets(self, scale):
        return self.a, self.last * scale.reshape(-1, 1, 1).to(self.last.dtype)


@register_rule(nn.Linear)
class LinearRule(Rule):
    """Ghost norm `‖a_i‖²‖b_i‖²`; sequences: Gram form `Σ_{s,t}(a_s·a_t)(b_s·b_t)` or the
    materialized gradient, whichever is cheaper; SAM view `W a' + c_i Σ_s b_s (a_s·a')`.
    """

    def accumulator(self, entry, calls, state=None):
        return _LinearAcc(entry, calls)

    def apply(self, entry: Entry, state, call: Call) -> Tensor:
        a_ref, b_ref = state  # [B, S, I], [B, S, O] (already scaled)
        out, x = call.out, call.x
        B = x.shape[0]
        xf = _flat(x)
        corr = None
        if "weight" in entry.params:
            if a_ref.shape[1] == 1 and xf.shape[1] == 1:  # plain batches: c_i δ_i (a_i · a'_i)
                corr = (xf * a_ref).sum(-1, keepdim=True) * b_ref
            else:
                corr = (xf @ a_ref.transpose(1, 2)) @ b_ref
        if "bias" in entry.params:
            db = b_ref.sum(1, keepdim=True)
            corr = db if corr is None else corr + db
        return out if corr is None else out + corr.expand(B, xf.shape[1], -1).reshape(out.shape)

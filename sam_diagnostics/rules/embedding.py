"""``nn.Embedding``: lookup ``E[idx]``; per-example gradient ``Σ_s b_s e_{idx_s}ᵀ``.

Squared norm in the Gram form ``Σ_{s,t} [idx_s = idx_t] (b_s · b_t)`` (positions equal to
``padding_idx`` get no gradient); perturbation by index matching. ``max_norm`` (which rewrites
the weight inside ``forward``) and ``scale_grad_by_freq`` are not exact per example: the plan
gives such modules the fallback (see :func:`covers`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Accumulator, Call, Entry, Rule, gram_sum, register_rule


def _cat_idx(calls) -> Tensor:
    B = calls[0].x.shape[0]
    idx = [c.x.reshape(B, -1) for c in calls]
    return idx[0] if len(idx) == 1 else torch.cat(idx, 1)


class _EmbeddingAcc(Accumulator):
    def __init__(self, entry: Entry, calls):
        self.entry, self.calls = entry, calls
        self.idx = _cat_idx(calls)  # [B, S]
        self.keep = None
        if entry.module.padding_idx is not None:
            self.keep = (self.idx != entry.module.padding_idx)[:, :, None]
        self.mask = None
        self.bb = None
        self.last = None

    def _b(self, cots):
        B = self.idx.shape[0]
        b = torch.cat([g.reshape(B, -1, g.shape[-1]) for g in cots], 1)
        return b * self.keep.to(b.dtype) if self.keep is not None else b

    def add(self, cots):
        b = self._b(cots)
        self.last = b
        if "weight" not in self.entry.params:
            return
        g = b @ b.transpose(1, 2)
        self.bb = g if self.bb is None else self.bb.add_(g)

    def result(self):
        if "weight" not in self.entry.params:
            return {}
        mask = (self.idx[:, :, None] == self.idx[:, None, :]).to(self.bb.dtype)
        return {"weight": gram_sum(mask, self.bb, (1, 2))}

    def offsets(self, scale):
        return self.idx, self.last * scale.reshape(-1, 1, 1).to(self.last.dtype)


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    """Gram form with an index-equality mask (`padding_idx` rows get no gradient); SAM view by
    index matching. `max_norm` / `scale_grad_by_freq`: not this rule.
    """

    params = ("weight",)

    def covers(self, module: nn.Embedding) -> bool:
        return module.max_norm is None and not module.scale_grad_by_freq

    def accumulator(self, entry, calls, state=None):
        return _EmbeddingAcc(entry, calls)

    def apply(self, entry: Entry, state, call: Call) -> Tensor:
        if "weight" not in entry.params:
            return call.out
        idx_ref, b_ref = state
        idx, out = call.x, call.out
        B = idx.shape[0]
        mask = (idx.reshape(B, -1, 1) == idx_ref[:, None, :]).to(b_ref.dtype)
        return out + (mask @ b_ref).reshape(out.shape)

"""Affine normalization layers: per-example ``Σ b ⊙ x̂`` (weight) and ``Σ b`` (bias).

``nn.LayerNorm`` sums over the leading (non-normalized) dimensions of one example,
``nn.GroupNorm`` over the spatial dimensions of each channel.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Call, Entry, Rule, register_rule


def _affine_grads(entry: Entry, xh: Tensor, b: Tensor, dims: tuple) -> dict[str, Tensor]:
    out = {}
    if "weight" in entry.params:
        out["weight"] = (b * xh).sum(dim=dims) if dims else b * xh
    if "bias" in entry.params:
        out["bias"] = b.sum(dim=dims) if dims else b
    return out


def _xhat_of(call: Call, fn) -> Tensor:
    """``x̂`` of a call, computed once per call (every direction reuses it)."""
    if "xhat" not in call.cache:
        call.cache["xhat"] = fn()
    return call.cache["xhat"]


def _affine_apply(state, xh_fn, out: Tensor, shape) -> Tensor:
    if "weight" in state:
        out = out + xh_fn() * state["weight"].reshape(shape)
    if "bias" in state:
        out = out + state["bias"].reshape(shape)
    return out


@register_rule(nn.LayerNorm)
class LayerNormRule(Rule):
    """Affine `y = x̂ ⊙ γ + β`: per-example `Σ b ⊙ x̂` and `Σ b` over the leading dimensions; SAM
    view `x̂' ⊙ Δγ_i + Δβ_i` added.
    """

    def _xhat(self, module, x):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)

    def grads(self, entry, call, b):
        m = entry.module
        nd = len(m.normalized_shape)
        xh = _xhat_of(call, lambda: self._xhat(m, call.x))
        return _affine_grads(entry, xh, b, tuple(range(1, b.dim() - nd)))

    def apply(self, entry: Entry, state, call: Call) -> Tensor:
        m, x = entry.module, call.x
        nd = len(m.normalized_shape)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1 - nd) + tuple(m.normalized_shape)
        return _affine_apply(state, lambda: self._xhat(m, x), call.out, shape)


@register_rule(nn.GroupNorm)
class GroupNormRule(Rule):
    """Per-channel affine: `Σ b ⊙ x̂` and `Σ b` over the spatial dimensions; SAM view `x̂' ⊙ Δγ_i +
    Δβ_i` added.
    """

    def _xhat(self, module, x):
        return F.group_norm(x, module.num_groups, None, None, module.eps)

    def grads(self, entry, call, b):
        xh = _xhat_of(call, lambda: self._xhat(entry.module, call.x))
        return _affine_grads(entry, xh, b, tuple(range(2, b.dim())))

    def apply(self, entry: Entry, state, call: Call) -> Tensor:
        m, x = entry.module, call.x
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        return _affine_apply(state, lambda: self._xhat(m, x), call.out, shape)

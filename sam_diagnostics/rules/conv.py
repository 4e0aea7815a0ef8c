"""``nn.Conv1d`` / ``nn.Conv2d`` (any stride, padding mode, dilation, groups).

Per-example weight gradient ``Σ_l b_l p_lᵀ`` from the unfolded input patches ``p``; its squared
norm in the Gram form ``Σ_{l,m} (p_l·p_m)(b_l·b_m)`` when that is cheaper (fewer FLOPs and a
bounded ``L × L`` Gram). Perturbation by a grouped convolution with per-example weights.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Accumulator, Call, Entry, Rule, gram_sum, register_rule, sumsq


def conv_input(module, x: Tensor) -> tuple[Tensor, tuple]:
    """Explicitly pad ``x`` as ``module`` would; returns the padded input and numeric padding."""
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        return x, (0,) * (x.dim() - 2)
    return x, module.padding


def patches(module, x: Tensor) -> Tensor:
    """Unfolded input patches ``[B, G, Cin/G · k, L]``."""
    x, pad = conv_input(module, x)
    if isinstance(module, nn.Conv1d):
        p = F.unfold(x.unsqueeze(2), (1, *module.kernel_size), dilation=(1, *module.dilation),
                     padding=(0, *pad), stride=(1, *module.stride))
    else:
        p = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=pad,
                     stride=module.stride)
    return p.reshape(p.shape[0], module.groups, -1, p.shape[-1])


class _ConvAcc(Accumulator):
    def __init__(self, entry: Entry, calls):
        m = entry.module
        self.entry, self.m = entry, m
        self.p = [patches(m, c.x) for c in calls]
        self.w = "weight" in entry.params
        self.bias = "bias" in entry.params
        B, G, P, L = self.p[0].shape
        O = m.out_channels // G
        # Gram form when cheaper per direction and its L × L Gram stays bounded
        self.gram = (self.w and len(calls) == 1 and L * (P + O) < O * P
                     and B * G * L * L < 2**26)
        if self.gram:
            p = self.p[0]
            self.gp = p.transpose(2, 3) @ p  # [B, G, L, L]
        self.gb = None
        self.total: dict[str, Tensor] = {}
        self.last = None
        self.last_grads: dict[str, Tensor] | None = None

    def _bb(self, b: Tensor) -> Tensor:
        B, G = b.shape[0], self.m.groups
        return b.reshape(B, G, self.m.out_channels // G, -1)  # [B, G, O, L]

    def _grads(self, cots) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for p, b in zip(self.p, cots):
            bb = self._bb(b)
            if self.w:
                g = (bb @ p.transpose(2, 3)).reshape(b.shape[0], *self.m.weight.shape)
                out["weight"] = out["weight"] + g if "weight" in out else g
            if self.bias:
                g = bb.sum(-1).reshape(b.shape[0], -1)
                out["bias"] = out["bias"] + g if "bias" in out else g
        return out

    def _acc(self, n, s):
        self.total[n] = self.total[n] + s if n in self.total else s

    def add(self, cots):
        self.last = cots
        if self.gram:
            bb = self._bb(cots[0])
            g = bb.transpose(2, 3) @ bb
            self.gb = g if self.gb is None else self.gb.add_(g)
            if self.bias:
                self._acc("bias", sumsq(bb.sum(-1), (1, 2)))
            return
        self.last_grads = self._grads(cots)
        for n, g in self.last_grads.items():
            self._acc(n, sumsq(g.reshape(g.shape[0], -1), 1))

    def result(self):
        if self.gram:
            self.total["weight"] = gram_sum(self.gp, self.gb, (1, 2, 3))
        return self.total

    def offsets(self, scale):
        B, G, P, L = self.p[0].shape
        O = self.m.out_channels // G
        c = scale.reshape(-1, 1, 1, 1)
        if self.w and len(self.p) == 1 and L * (P + O) < 2 * O * P:
            # Gram form (never builds Δ_i): conv(x', Δ_i) = c_i B_i (P_iᵀ P'_i)
            state = {"gram": (self.p[0], self._bb(self.last[0]) * c.to(self.last[0].dtype))}
            if self.bias:
                state["bias"] = self._bb(self.last[0]).sum(-1).reshape(B, -1) * c[:, :, 0, 0]
            return state
        g = self.last_grads if self.last_grads is not None else self._grads(self.last)
        return {n: v * scale.reshape(-1, *[1] * (v.dim() - 1)).to(v.dtype) for n, v in g.items()}


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(Rule):
    """Unfolded patches: per-example gradient `Σ_l b_l p_lᵀ`, or the Gram form
    `Σ_{l,m}(p_l·p_m)(b_l·b_m)` where cheaper; SAM view: grouped convolution with per-example
    weights.
    """

    def accumulator(self, entry, calls, state=None):
        return _ConvAcc(entry, calls)

    def apply(self, entry: Entry, state, call: Call) -> Tensor:
        m, out = entry.module, call.out
        if "gram" in state:
            p_ref, b_ref = state["gram"]  # [B, G, P, L], [B, G, O, L] (scaled)
            y = b_ref @ (p_ref.transpose(2, 3) @ patches(m, call.x))  # [B, G, O, L']
            out = out + y.reshape(out.shape)
            if "bias" in state:
                out = out + state["bias"].reshape(out.shape[0], -1, *[1] * (out.dim() - 2))
            return out
        x, pad = conv_input(m, call.x)
        B = x.shape[0]
        if "weight" in state:
            w = state["weight"].reshape(-1, *m.weight.shape[1:])
            conv = F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d
            y = conv(x.reshape(1, -1, *x.shape[2:]), w, None, m.stride, pad, m.dilation,
                     m.groups * B)
            out = out + y.reshape(out.shape)
        if "bias" in state:
            out = out + state["bias"].reshape(B, -1, *[1] * (out.dim() - 2))
        return out


__all__ = ["ConvRule", "conv_input", "patches"]

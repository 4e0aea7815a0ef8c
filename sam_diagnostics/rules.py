"""Per-layer rules: exact per-example parameter-gradient norms and per-example perturbations.

One place holds the special cases (the BackPACK / Opacus idea): each rule knows, for one module
type, how to turn the module's inputs ``a`` and a batch of output cotangents ``b`` into

* ``sq_norms``: per-example squared norms ``Σ_k ‖∂(b_k · out_i)/∂θ‖²`` for each trainable
  parameter of the module, **without** materializing per-example gradients when a cheaper
  ("ghost") form exists, and
* ``prepare`` / ``apply``: the module's output at per-example parameters ``θ + c_i g_i``
  (``g_i`` the per-example gradient for cotangent ``b_i``), used for the SAM view and for 1-SAM.

Cotangents always carry a leading "direction" axis ``K``: ``K = C`` one-hot directions give the
Jacobian norm ``‖J_i‖_F²`` (SPEC 2.3), ``K = 1`` with the logit term ``δ_i`` gives the gradient
norm, ``K`` Rademacher directions give Hutchinson's estimate.

Rules
-----
========================  =====================================================================
Linear (any leading dims)  ghost norm ``‖a_i‖²‖b_i‖²``; sequences: Gram form
                           ``Σ_{s,t}(a_s·a_t)(b_s·b_t)`` or the materialized gradient, whichever
                           is cheaper; perturbation ``W a' + c_i Σ_s b_s (a_s · a')`` (SPEC 2.2)
Embedding                  Gram form with an index-equality mask; perturbation by index matching
Conv1d / Conv2d            per-example gradient from unfolded patches (or the Gram form when
                           cheaper); perturbation by a grouped convolution with per-example weights
LayerNorm / GroupNorm      per-example affine gradients ``Σ b ⊙ x̂`` and ``Σ b``
anything else              :class:`FallbackRule`: torch.func ``vmap(vjp)`` over the module's own
                           parameters (exact for any module whose examples are independent)
========================  =====================================================================

Add a layer type with :func:`register_rule` and one small class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

__all__ = ["Rule", "register_rule", "rule_for", "NotFastError", "FallbackRule", "RULES"]


class NotFastError(RuntimeError):
    """Raised when the per-layer path cannot compute a quantity exactly for this model/call."""


RULES: dict[type, Rule] = {}


def register_rule(*module_types: type):
    """Class decorator registering a :class:`Rule` for the given module types."""

    def deco(cls):
        for t in module_types:
            RULES[t] = cls()
        return cls

    return deco


def rule_for(module: nn.Module) -> Rule | None:
    """The registered rule for ``module`` (most specific type in its MRO), or ``None``."""
    for t in type(module).__mro__:
        if t in RULES:
            return RULES[t]
    return None


def trainable(module: nn.Module, recurse: bool = False) -> dict[str, Tensor]:
    """The module's parameters that require grad, by (relative) name."""
    return {n: p for n, p in module.named_parameters(recurse=recurse) if p.requires_grad}


class Rule:
    """Base class: a materialized rule (per-example gradients summed over calls, then squared).

    Subclasses implement :meth:`grads` (per-example gradients per call) and :meth:`apply`
    (output at per-example parameters ``θ + Δ_i``); Gram-form rules override :meth:`sq_norms`.
    """

    def grads(self, module: nn.Module, a, b: Tensor, state=None) -> dict[str, Tensor]:
        """Per-example gradients ``{name: [K, B, *shape]}`` of one call.

        ``a`` is the call's ``(args, kwargs)``, ``b`` the output cotangents ``[K, B, *out]`` and
        ``state`` the per-example parameter offsets when the call ran perturbed (only rules whose
        gradient depends on the parameter values need it).
        """
        raise NotImplementedError

    def apply(self, module: nn.Module, state, a, out: Tensor) -> Tensor:
        """The output of the call ``a = (args, kwargs)`` at the perturbed parameters ``θ + Δ_i``."""
        raise NotImplementedError

    def _summed_grads(self, module, inputs, cots, state=None) -> dict[str, Tensor]:
        """Per-example gradients summed over the module's calls (cross terms included)."""
        total: dict[str, Tensor] = {}
        for a, b in zip(inputs, cots):
            for n, g in self.grads(module, a, b, state).items():
                total[n] = total[n] + g if n in total else g
        return total

    def norms_and_grads(self, module, inputs: Sequence, cots: Sequence[Tensor], state=None):
        """``({name: Σ_k ‖g_{k,i}‖² [B]}, per-example gradients or None)``.

        Materialized rules return the gradients they computed anyway, so that :meth:`prepare`
        can reuse them; Gram-form rules return ``None``.
        """
        K, B = cots[0].shape[:2]
        if K == 1:
            g = self._summed_grads(module, inputs, cots, state)
            return {n: sumsq(v.flatten(2), (0, 2)) for n, v in g.items()}, g
        # several directions in chunks: memory bounded, never K × B × module parameters
        size = B * sum(p.numel() for p in trainable(module, recurse=self is FALLBACK).values())
        return _per_direction(
            lambda k0, k1: self._summed_grads(module, inputs, [c[k0:k1] for c in cots], state),
            K, size), None

    def sq_norms(self, module, inputs: Sequence, cots: Sequence[Tensor], state=None):
        """Per-example ``Σ_k ‖g_{k,i}‖²`` for each trainable parameter, ``{name: [B]}``."""
        return self.norms_and_grads(module, inputs, cots, state)[0]

    def prepare(self, module, inputs: Sequence, cots: Sequence[Tensor], scale: Tensor,
                grads: dict | None = None):
        """Per-example parameter offsets ``Δ_i = scale_i · g_i`` as the state for :meth:`apply`
        (``grads``: the gradients :meth:`norms_and_grads` returned, if any)."""
        grads = grads if grads is not None else self._summed_grads(module, inputs, cots)
        return {n: g[0] * scale.reshape(-1, *[1] * (g.dim() - 2)).to(g.dtype)
                for n, g in grads.items()}


def sumsq(x: Tensor, dim) -> Tensor:
    """``Σ x²`` over ``dim`` as one fused reduction (no squared copy of ``x``)."""
    return torch.linalg.vector_norm(x, dim=dim).square()


#: Per-example gradients of several directions are materialized in chunks of at most this
#: many elements (256 MiB in float32), so a large layer never costs K × B × its parameters.
CHUNK_ELEMENTS = 2**26


def _per_direction(grads_of, K: int, per_direction: int) -> dict[str, Tensor]:
    """``Σ_k ‖g_k‖²`` per parameter from ``grads_of(k0, k1) -> {name: [k1 - k0, B, *shape]}``,
    ``per_direction`` elements (B × parameters) at a time bounded by :data:`CHUNK_ELEMENTS`."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_direction))
    total: dict[str, Tensor] = {}
    for k0 in range(0, K, step):
        for n, v in grads_of(k0, min(K, k0 + step)).items():
            s = sumsq(v.flatten(2), (0, 2))
            total[n] = total[n] + s if n in total else s
    return total


def _flat_seq(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``a [B, *, I] -> [B, S, I]`` and ``b [K, B, *, O] -> [K, B, S, O]``."""
    B, K = a.shape[0], b.shape[0]
    return a.reshape(B, -1, a.shape[-1]), b.reshape(K, B, -1, b.shape[-1])


@register_rule(nn.Linear)
class LinearRule(Rule):
    """``z = W a + c``: per-example gradient ``Σ_s b_s a_sᵀ`` (``S = 1`` for plain batches)."""

    def _cat(self, inputs, cots):
        pairs = [_flat_seq(a[0][0], b) for a, b in zip(inputs, cots)]
        if len(pairs) == 1:
            return pairs[0]
        return torch.cat([p[0] for p in pairs], 1), torch.cat([p[1] for p in pairs], 2)

    def norms_and_grads(self, module, inputs, cots, state=None):
        a, b = self._cat(inputs, cots)  # [B, S, I], [K, B, S, O]
        K, B, S, O = b.shape
        I = a.shape[-1]
        out = {}
        if module.weight.requires_grad:
            if S == 1:
                out["weight"] = sumsq(a[:, 0], -1) * sumsq(b[:, :, 0], (0, 2))
            elif S * (I + K * O) <= K * I * O:  # Gram form is cheaper
                ga = a @ a.transpose(1, 2)
                gb = torch.einsum("kbso,kbto->bst", b, b)
                out["weight"] = (ga * gb).sum(dim=(1, 2))
            else:
                g = torch.einsum("kbso,bsi->kboi", b, a)
                out["weight"] = sumsq(g, (0, 2, 3))
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = sumsq(b[:, :, 0] if S == 1 else b.sum(2), (0, 2))
        return out, None

    def prepare(self, module, inputs, cots, scale, grads=None):
        a, b = self._cat(inputs, cots)
        return a, b[0] * scale.reshape(-1, 1, 1).to(b.dtype)

    def apply(self, module, state, a_new, out):
        a_ref, b_ref = state  # [B, S, I], [B, S, O] (already scaled)
        x = a_new[0][0]
        B = x.shape[0]
        xf = x.reshape(B, -1, x.shape[-1])
        corr = None
        if module.weight.requires_grad:
            if a_ref.shape[1] == 1 and xf.shape[1] == 1:  # plain batches: c_i δ_i (a_i · a'_i)
                corr = (xf * a_ref).sum(-1, keepdim=True) * b_ref
            else:
                corr = (xf @ a_ref.transpose(1, 2)) @ b_ref
        if module.bias is not None and module.bias.requires_grad:
            db = b_ref.sum(1, keepdim=True)
            corr = db if corr is None else corr + db
        return out if corr is None else out + corr.expand(B, xf.shape[1], -1).reshape(out.shape)


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    """Lookup ``E[idx]``: per-example gradient ``Σ_s b_s e_{idx_s}ᵀ``; Gram form, index mask."""

    def _check(self, module):
        if module.max_norm is not None or module.scale_grad_by_freq:
            raise NotFastError("Embedding with max_norm or scale_grad_by_freq")

    def _cat(self, module, inputs, cots):
        B = inputs[0][0][0].shape[0]
        idx = torch.cat([a[0][0].reshape(B, -1) for a in inputs], 1)
        b = torch.cat([g.reshape(g.shape[0], B, -1, g.shape[-1]) for g in cots], 2)
        if module.padding_idx is not None:
            b = b * (idx != module.padding_idx)[None, :, :, None].to(b.dtype)
        return idx, b

    def norms_and_grads(self, module, inputs, cots, state=None):
        self._check(module)
        if not module.weight.requires_grad:
            return {}, None
        idx, b = self._cat(module, inputs, cots)
        mask = (idx[:, :, None] == idx[:, None, :]).to(b.dtype)
        return {"weight": (mask * torch.einsum("kbsd,kbtd->bst", b, b)).sum(dim=(1, 2))}, None

    def prepare(self, module, inputs, cots, scale, grads=None):
        self._check(module)
        idx, b = self._cat(module, inputs, cots)
        return idx, b[0] * scale.reshape(-1, 1, 1).to(b.dtype)

    def apply(self, module, state, a_new, out):
        if not module.weight.requires_grad:
            return out
        idx_ref, b_ref = state
        idx = a_new[0][0]
        B = idx.shape[0]
        mask = (idx.reshape(B, -1, 1) == idx_ref[:, None, :]).to(b_ref.dtype)
        return out + (mask @ b_ref).reshape(out.shape)


def _conv_input(module, x: Tensor) -> tuple[Tensor, tuple]:
    """Explicitly pad ``x`` as ``module`` would; returns the padded input and numeric padding."""
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        return x, (0,) * (x.dim() - 2)
    return x, module.padding


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(Rule):
    """Convolution: per-example weight gradient from unfolded input patches."""

    def _patches(self, module, x):
        x, pad = _conv_input(module, x)
        if isinstance(module, nn.Conv1d):
            p = F.unfold(x.unsqueeze(2), (1, *module.kernel_size), dilation=(1, *module.dilation),
                         padding=(0, *pad), stride=(1, *module.stride))
        else:
            p = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=pad,
                         stride=module.stride)
        G = module.groups
        return p.reshape(p.shape[0], G, -1, p.shape[-1])  # [B, G, Cin/G*kk, L]

    def _grads_from(self, module, p, b):
        K, B, G = b.shape[0], b.shape[1], module.groups
        bb = b.reshape(K, B, G, -1, p.shape[-1])  # [K, B, G, Cout/G, L]
        out = {}
        if module.weight.requires_grad:
            g = torch.einsum("kbgol,bgpl->kbgop", bb, p)
            out["weight"] = g.reshape(K, B, *module.weight.shape)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = bb.sum(-1).reshape(K, B, -1)
        return out

    def grads(self, module, a, b, state=None):
        return self._grads_from(module, self._patches(module, a[0][0]), b)

    def norms_and_grads(self, module, inputs, cots, state=None):
        if len(inputs) != 1:
            return super().norms_and_grads(module, inputs, cots, state)
        p = self._patches(module, inputs[0][0][0])  # unfolded once
        b = cots[0]
        K, B, G, L = b.shape[0], b.shape[1], module.groups, p.shape[-1]
        P, O = p.shape[2], module.out_channels // G
        gram = L * (P + K * O) < K * O * P and B * G * L * L < 2**26
        if module.weight.requires_grad and gram:  # Gram form cheaper than the gradient
            bb = b.reshape(K, B, G, O, L)
            gp = torch.einsum("bgpl,bgpm->bglm", p, p)
            gb = torch.einsum("kbgol,kbgom->bglm", bb, bb)
            out = {"weight": (gp * gb).sum(dim=(1, 2, 3))}
            if module.bias is not None and module.bias.requires_grad:
                out["bias"] = sumsq(bb.sum(-1), (0, 2, 3))
            return out, None
        if K > 1:  # directions in chunks: memory bounded, never K × B × layer parameters
            return _per_direction(lambda k0, k1: self._grads_from(module, p, b[k0:k1]), K,
                                  B * module.weight.numel()), None
        g = self._grads_from(module, p, b)
        return {n: sumsq(v.flatten(2), (0, 2)) for n, v in g.items()}, g

    def apply(self, module, state, a_new, out):
        x, pad = _conv_input(module, a_new[0][0])
        B = x.shape[0]
        if "weight" in state:
            w = state["weight"].reshape(-1, *module.weight.shape[1:])
            conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
            y = conv(x.reshape(1, -1, *x.shape[2:]), w, None, module.stride, pad,
                     module.dilation, module.groups * B)
            out = out + y.reshape(out.shape)
        if "bias" in state:
            out = out + state["bias"].reshape(B, -1, *[1] * (out.dim() - 2))
        return out


@register_rule(nn.LayerNorm)
class LayerNormRule(Rule):
    """Affine LayerNorm ``y = x̂ ⊙ γ + β``: per-example ``Σ b ⊙ x̂`` and ``Σ b`` over leading dims."""

    def _xhat(self, module, x):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)

    def grads(self, module, a, b, state=None):
        xh = self._xhat(module, a[0][0])
        nd = len(module.normalized_shape)
        lead = tuple(range(2, b.dim() - nd))
        out = {}
        if module.weight is not None and module.weight.requires_grad:
            out["weight"] = (b * xh).sum(dim=lead) if lead else b * xh
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = b.sum(dim=lead) if lead else b
        return out

    def apply(self, module, state, a_new, out):
        x = a_new[0][0]
        B, nd = x.shape[0], len(module.normalized_shape)
        shape = (B,) + (1,) * (x.dim() - 1 - nd) + tuple(module.normalized_shape)
        if "weight" in state:
            out = out + self._xhat(module, x) * state["weight"].reshape(shape)
        if "bias" in state:
            out = out + state["bias"].reshape(shape)
        return out


@register_rule(nn.GroupNorm)
class GroupNormRule(Rule):
    """Affine GroupNorm: per-channel ``Σ_spatial b ⊙ x̂`` and ``Σ_spatial b``."""

    def grads(self, module, a, b, state=None):
        xh = F.group_norm(a[0][0], module.num_groups, None, None, module.eps)
        sp = tuple(range(3, b.dim()))
        out = {}
        if module.weight is not None and module.weight.requires_grad:
            out["weight"] = (b * xh).sum(dim=sp) if sp else b * xh
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = b.sum(dim=sp) if sp else b
        return out

    def apply(self, module, state, a_new, out):
        x = a_new[0][0]
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        if "weight" in state:
            xh = F.group_norm(x, module.num_groups, None, None, module.eps)
            out = out + xh * state["weight"].reshape(shape)
        if "bias" in state:
            out = out + state["bias"].reshape(shape)
        return out


class FallbackRule(Rule):
    """Any other module with parameters: torch.func per-example VJPs over its whole subtree.

    Exact whenever the module treats examples independently (tensor arguments whose first
    dimension is the batch are split per example; others are shared). Memory ``O(B × K ×
    module parameters)`` — the reason the rules above exist.
    """

    def _split(self, args, kwargs, B):
        flat = list(args) + list(kwargs.values())
        dims = [0 if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == B else None
                for t in flat]
        return flat, dims

    def _fn(self, module, args, kwargs, B):
        params = trainable(module, recurse=True)
        flat, dims = self._split(args, kwargs, B)
        n_args, keys = len(args), list(kwargs)

        def f(p, *xs):
            xs = [x.unsqueeze(0) if d == 0 else x for x, d in zip(xs, dims)]
            out = functional_call(module, p, tuple(xs[:n_args]),
                                  dict(zip(keys, xs[n_args:])), strict=False)
            if not isinstance(out, Tensor):
                raise NotFastError(f"module {type(module).__name__} returns a non-tensor")
            return out.squeeze(0)

        return f, params, flat, dims

    def grads(self, module, a, b, state=None):
        args, kwargs = a
        B = b.shape[1]
        f, params, flat, dims = self._fn(module, args, kwargs, B)
        base = {n: p.detach() for n, p in params.items()}

        def one(delta, b_i, *xs):
            p = {n: base[n] + delta[n] for n in base} if delta is not None else base
            _, pullback = vjp(lambda q: f(q, *xs), p)
            return vmap(lambda c: pullback(c)[0])(b_i)  # over K directions

        delta = state if state else None
        g = vmap(one, in_dims=(0 if delta is not None else None, 1, *dims))(delta, b, *flat)
        return {n: v.transpose(0, 1) for n, v in g.items()}  # [K, B, *shape]

    def apply(self, module, state, a_new, out):
        args, kwargs = a_new
        B = out.shape[0]
        f, params, flat, dims = self._fn(module, args, kwargs, B)

        def one(delta, *xs):
            return f({n: params[n] + delta[n] for n in params}, *xs)

        return vmap(one, in_dims=(0, *dims))(state, *flat)


FALLBACK = FallbackRule()


"""Every per-layer rule against autograd on single examples, on random shapes (float64).

Checks both faces of a rule: per-example squared gradient norms for a batch of output
cotangents (``sq_norms``) and the module's output at per-example parameters ``θ + c_i g_i``
(``prepare`` / ``apply``, the SAM view and 1-SAM).
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from problems import Scale
from torch import nn
from torch.func import functional_call

from sam_diagnostics.plan import exact_plan, make_plan
from sam_diagnostics.rules import FALLBACK, Call, Entry, functional, rule_for

SETTINGS = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def reference(module, a, b, scale, a_new):
    """Per-example Σ_k ‖∂(b_k · out_i)/∂θ‖² and out_i(θ + scale_i g_i) by a Python loop."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if not params:
        return torch.zeros(a.shape[0], dtype=torch.float64), module(a_new).detach()
    sq, outs = [], []
    for i in range(a.shape[0]):
        out = module(a[i : i + 1])
        total, g0 = 0.0, None
        for k in range(b.shape[0]):
            g = torch.autograd.grad((out * b[k, i : i + 1]).sum(), list(params.values()),
                                    retain_graph=True)
            total = total + sum(v.pow(2).sum() for v in g)
            g0 = g if k == 0 else g0
        sq.append(total)
        pert = {n: p.detach() + scale[i] * v for (n, p), v in zip(params.items(), g0)}
        outs.append(functional_call(module, pert, (a_new[i : i + 1],))[0])
    return torch.stack(sq), torch.stack(outs)


def entry_of(module, rule=None):
    """The plan entry a module gets (or the fallback over it)."""
    if rule is FALLBACK:
        fn, params = functional(module)
        return Entry("", module, FALLBACK, params, fn)
    own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    return Entry("", module, rule or rule_for(module), own)


def sq_norms(entry, calls, cots):
    """Stream the directions of ``cots`` (one ``[K, B, *out]`` per call) through the rule."""
    acc = entry.rule.accumulator(entry, calls)
    for k in range(cots[0].shape[0]):
        acc.add([c[k] for c in cots])
    return acc


def check_rule(module, a, K=3, rule=None):
    module = module.double()
    entry = entry_of(module, rule)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = module(a)
    b = torch.randn((K, *out.shape), generator=g, dtype=torch.float64)
    scale = torch.rand(a.shape[0], generator=g, dtype=torch.float64)
    a_new = a.roll(1, 0) if a.is_floating_point() else a.flip(0)
    sq_ref, out_ref = reference(module, a, b, scale, a_new)
    calls = [Call((a,), {}, out, (0,), 0)]
    got = sq_norms(entry, calls, [b]).result()
    total = sum(got.values()) if got else torch.zeros(a.shape[0], dtype=torch.float64)
    torch.testing.assert_close(total, sq_ref, rtol=1e-6, atol=1e-9)
    state = sq_norms(entry, calls, [b[:1]]).offsets(scale)
    with torch.no_grad():
        new = Call((a_new,), {}, module(a_new), (0,), 0)
        got_out = entry.rule.apply(entry, state, new)
        if entry.rule.subtree:
            got_out = got_out[0]
    torch.testing.assert_close(got_out, out_ref, rtol=1e-6, atol=1e-9)


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@SETTINGS
@given(B=st.integers(1, 4), I=st.integers(1, 6), O=st.integers(1, 5), seq=st.integers(0, 4),
       bias=st.booleans(), frozen=st.sampled_from(["none", "weight", "bias"]))
def test_linear(B, I, O, seq, bias, frozen):
    lin = nn.Linear(I, O, bias=bias)
    if frozen == "weight":
        lin.weight.requires_grad_(False)
    if frozen == "bias" and bias:
        lin.bias.requires_grad_(False)
    a = randn(B, I) if seq == 0 else randn(B, seq, I)
    check_rule(lin, a)


@SETTINGS
@given(B=st.integers(1, 3), cin_g=st.integers(1, 3), cout_g=st.integers(1, 3),
       groups=st.integers(1, 2), k=st.integers(1, 3), stride=st.integers(1, 2),
       pad=st.sampled_from([0, 1, "same", "valid"]), dil=st.integers(1, 2),
       mode=st.sampled_from(["zeros", "reflect", "circular"]), L=st.integers(6, 9),
       bias=st.booleans())
def test_conv1d(B, cin_g, cout_g, groups, k, stride, pad, dil, mode, L, bias):
    if pad == "same":
        stride = 1
    conv = nn.Conv1d(cin_g * groups, cout_g * groups, k, stride=stride, padding=pad,
                     dilation=dil, groups=groups, bias=bias, padding_mode=mode)
    check_rule(conv, randn(B, cin_g * groups, L))


@SETTINGS
@given(B=st.integers(1, 3), groups=st.integers(1, 2), k=st.integers(1, 3),
       stride=st.integers(1, 2), pad=st.sampled_from([0, 1, "same"]), dil=st.integers(1, 2),
       H=st.integers(5, 7), bias=st.booleans(), K=st.integers(1, 4))
def test_conv2d(B, groups, k, stride, pad, dil, H, bias, K):
    if pad == "same":
        stride = 1
    conv = nn.Conv2d(2 * groups, 3 * groups, (k, k + 1 if k < 3 else k), stride=stride,
                     padding=pad, dilation=dil, groups=groups, bias=bias)
    check_rule(conv, randn(B, 2 * groups, H, H + 1), K=K)


@SETTINGS
@given(B=st.integers(1, 4), S=st.integers(1, 6), V=st.integers(2, 6),
       pad=st.sampled_from([None, 0]))
def test_embedding(B, S, V, pad):
    emb = nn.Embedding(V, 3, padding_idx=pad)
    check_rule(emb, torch.randint(0, V, (B, S)))


@SETTINGS
@given(B=st.integers(1, 4), S=st.integers(0, 3), D=st.integers(2, 5), bias=st.booleans(),
       two_dims=st.booleans())
def test_layernorm(B, S, D, bias, two_dims):
    shape = (2, D) if two_dims else (D,)
    ln = nn.LayerNorm(shape, bias=bias)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    check_rule(ln, randn(B, *([S] if S else []), *shape))


@SETTINGS
@given(B=st.integers(1, 4), G=st.sampled_from([1, 2]), C=st.sampled_from([2, 4]),
       spatial=st.sampled_from([(), (5,), (3, 4)]))
def test_groupnorm(B, G, C, spatial):
    gn = nn.GroupNorm(G, C)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-1, 1)
    check_rule(gn, randn(B, C, *spatial) if spatial else randn(B, C, 3))


class Bilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.u = nn.Parameter(torch.randn(4))
        self.inner = nn.Linear(4, 3)

    def forward(self, x):
        return self.inner(x * self.u) ** 2


@pytest.mark.parametrize("B", [1, 3])
def test_fallback_module_with_subtree(B):
    """A module without a rule: torch.func per-example VJPs over its whole subtree."""
    module = Bilinear()
    assert make_plan(module).whole  # the root owns a parameter: the exact plan
    assert exact_plan(module).entries[""].rule is FALLBACK
    check_rule(module, randn(B, 4), rule=FALLBACK)


def test_fallback_on_a_rule_layer_agrees_with_the_rule():
    lin = nn.Linear(4, 3).double()
    a = randn(3, 5, 4)
    b = randn(2, 3, 5, 3)
    with torch.no_grad():
        calls = [Call((a,), {}, lin(a), (0,), 0)]
    fast = sum(sq_norms(entry_of(lin), calls, [b]).result().values())
    slow = sum(sq_norms(entry_of(lin, FALLBACK), calls, [b]).result().values())
    torch.testing.assert_close(fast, slow)


def test_module_called_twice_includes_cross_terms():
    lin = nn.Linear(3, 3).double()
    a1, a2 = randn(2, 3), randn(2, 3)
    b1, b2 = randn(1, 2, 3), randn(1, 2, 3)
    calls = [Call((a1,), {}, None, (0,), 0), Call((a2,), {}, None, (0,), 0)]
    got = sum(sq_norms(entry_of(lin), calls, [b1, b2]).result().values())
    for i in range(2):
        gw = torch.outer(b1[0, i], a1[i]) + torch.outer(b2[0, i], a2[i])
        gb = b1[0, i] + b2[0, i]
        torch.testing.assert_close(got[i], gw.pow(2).sum() + gb.pow(2).sum())


def test_registering_a_rule_is_one_class():
    from sam_diagnostics.rules import RULES, register_rule
    from sam_diagnostics.rules.linear import LinearRule

    class MyLinear(nn.Linear):
        pass

    assert rule_for(MyLinear(2, 2)) is None  # rules match exact types: a subclass is not Linear

    @register_rule(MyLinear)
    class MyRule(LinearRule):
        pass

    try:
        assert isinstance(rule_for(MyLinear(2, 2)), MyRule)
        check_rule(MyLinear(3, 2), randn(3, 3))
    finally:
        del RULES[MyLinear]


def test_directions_in_small_chunks_give_the_same_norms(monkeypatch):
    """Materialized rules split the K directions into memory-bounded chunks."""
    import sam_diagnostics as sd
    from sam_diagnostics.rules import base, fallback

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 4, 3, groups=2), nn.GroupNorm(2, 4), nn.Tanh(),
                        nn.Flatten(), nn.LayerNorm(24), Bilinear_head()).double()
    x = randn(3, 2, 8)
    whole = sd.jacobian_norms(net, x, "fast")
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(fallback, "CHUNK_ELEMENTS", 1)
    torch.testing.assert_close(sd.jacobian_norms(net, x, "fast"), whole)
    torch.testing.assert_close(whole, sd.jacobian_norms(net, x, "exact"))


def Bilinear_head():  # noqa: N802 - a tiny factory: custom parameter (fallback) + Linear head
    return nn.Sequential(Scale(24), nn.Linear(24, 5))



def test_layer_tables_in_the_docs_are_generated_from_the_registry():
    from pathlib import Path

    from sam_diagnostics.rules.__main__ import BEGIN, fill

    root = Path(__file__).resolve().parents[1]
    docs = [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
            if BEGIN in p.read_text()]
    assert docs, "no rule table in the docs"
    for p in docs:
        assert fill(p.read_text()) == p.read_text(), (
            f"{p.name}: run python -m sam_diagnostics.rules --write {p.relative_to(root)}")


@pytest.mark.parametrize("groups,bias", [(1, True), (2, False)])
def test_conv_gram_forms_for_deep_narrow_layers(groups, bias):
    """Many channels, few positions: the norm and the SAM-view output take the Gram forms
    (``conv(x', Δ_i) = c_i B_i (P_iᵀ P'_i)`` never builds ``Δ_i``)."""
    from sam_diagnostics.rules.conv import _ConvAcc

    conv = nn.Conv2d(16, 16, 3, padding=1, groups=groups, bias=bias).double()
    a = randn(3, 16, 3, 3)
    with torch.no_grad():
        acc = _ConvAcc(entry_of(conv), [Call((a,), {}, conv(a), (0,), 0)])
    assert acc.gram == (groups == 1)  # groups = 2: the materialized norm, the Gram SAM view
    acc.add([randn(3, 16, 3, 3)])
    assert "gram" in acc.offsets(torch.ones(3, dtype=torch.float64))
    check_rule(conv, a)

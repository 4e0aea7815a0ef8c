"""Independent cross-check of the public API against a naive float64 reference.

The reference below was written from SPEC sections 2.1-2.3 and the public docstrings only: a
Python loop over single examples, ``torch.autograd.grad`` one logit at a time for the Jacobian,
explicit parameter copies at ``w + ε``. The architectures are deliberately different from the
ones in ``tests/problems.py``.
"""

from __future__ import annotations

import copy
import math
from functools import cache

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sam_diagnostics as sd

torch.set_num_threads(1)

RTOL = 1e-6
RHO = 0.2
LR = 0.5


# --------------------------------------------------------------------------- architectures


class TinyTransformer(nn.Module):
    """Embedding + single-head q/k/v/o attention + residual LayerNorm + mean-pool + head."""

    def __init__(self, vocab=9, length=5, d=6, c=3):
        super().__init__()
        self.length = length
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(length, d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, c)

    def forward(self, idx):
        # positions indexed per example ([B, L]); see the report for the unbatched [L] form
        pos = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
        h = self.tok(idx) + self.pos(pos)
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        h = self.norm(h + self.o(att @ v))
        return self.head(h.mean(dim=1))


class MHANet(nn.Module):
    """nn.MultiheadAttention(batch_first=True) between an input projection and the head."""

    def __init__(self, d_in=3, d=8, heads=2, c=4):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, c)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm(h + a)
        return self.head(h.mean(dim=1))


class ExpScale(nn.Module):
    """Custom module owning parameters used through torch.exp: x * exp(log_gain) + shift."""

    def __init__(self, d):
        super().__init__()
        self.log_gain = nn.Parameter(torch.linspace(-0.4, 0.4, d))
        self.shift = nn.Parameter(torch.linspace(0.1, -0.1, d))

    def forward(self, x):
        return x * torch.exp(self.log_gain) + self.shift


class ReusedLinear(nn.Module):
    """One Linear applied twice (parameter used at two sites of its own module)."""

    def __init__(self, d_in=4, d=5, c=3):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, c)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.sin(self.shared(h)) + h
        return self.head(h)


def mlp_gelu_ln():
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 7),
                         nn.LayerNorm(7), nn.GELU(approximate="tanh"),
                         nn.Linear(7, 4, bias=False))


def conv1d_dilated_grouped():
    # L=16 -> (pad 2, dil 2, k 3) 16 -> (dil 3, k 3, stride 2) 5
    return nn.Sequential(nn.Unflatten(1, (2, 16)),
                         nn.Conv1d(2, 6, 3, dilation=2, groups=2, padding=2), nn.ELU(),
                         nn.Conv1d(6, 6, 3, dilation=3, groups=3, stride=2), nn.Softplus(),
                         nn.Flatten(), nn.Linear(30, 3))


def conv2d_gn_reflect():
    # 8x8 -> stride 2 -> 4x4 -> 4x4 -> avgpool 2 -> 2x2
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, padding_mode="reflect"), nn.GroupNorm(2, 4),
        nn.SiLU(),
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=False), nn.GroupNorm(3, 6),
        nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(24, 5))


def exp_param():
    return nn.Sequential(nn.Linear(4, 6), ExpScale(6), nn.Softplus(), nn.Linear(6, 3))


def frozen_middle():
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(),
                        nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.ReLU()),
                        nn.Linear(6, 6), nn.Sigmoid(), nn.Linear(6, 3))
    for p in net[2].parameters():
        p.requires_grad_(False)
    return net


def binary_one_logit():
    return nn.Sequential(nn.Linear(4, 6), nn.LeakyReLU(0.1), nn.Linear(6, 5), nn.Mish(),
                         nn.Linear(5, 1))


def dropout_mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 6), nn.Tanh(),
                         nn.Dropout(0.3), nn.Linear(6, 3))


def batchnorm_eval():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        net[1].running_mean.copy_(torch.linspace(-0.3, 0.3, 6))
        net[1].running_var.copy_(torch.linspace(0.5, 2.0, 6))
        net[1].weight.copy_(torch.linspace(0.8, 1.3, 6))
        net[1].bias.copy_(torch.linspace(-0.2, 0.1, 6))
    return net


# name: (factory, input maker (B, generator) -> inputs, classes (1 = binary head), watched layers)
ARCHS = {
    "mlp_gelu_ln": (mlp_gelu_ln, lambda b, g: torch.randn(b, 6, generator=g), 4, ["3"]),
    "conv1d_dilated_grouped": (conv1d_dilated_grouped,
                               lambda b, g: torch.randn(b, 32, generator=g), 3, ["3"]),
    "conv2d_gn_reflect": (conv2d_gn_reflect, lambda b, g: torch.randn(b, 2, 8, 8, generator=g),
                          5, ["3"]),
    "tiny_transformer": (TinyTransformer, lambda b, g: torch.randint(0, 9, (b, 5), generator=g),
                         3, ["o"]),
    "mha": (MHANet, lambda b, g: torch.randn(b, 4, 3, generator=g), 4, ["norm"]),
    "exp_param": (exp_param, lambda b, g: torch.randn(b, 4, generator=g), 3, ["2"]),
    "frozen_middle": (frozen_middle, lambda b, g: torch.randn(b, 5, generator=g), 3, ["2"]),
    "binary_one_logit": (binary_one_logit, lambda b, g: torch.randn(b, 4, generator=g), 1,
                         ["2"]),
    "dropout_mlp": (dropout_mlp, lambda b, g: torch.randn(b, 5, generator=g), 3, ["3"]),
    "batchnorm_eval": (batchnorm_eval, lambda b, g: torch.randn(b, 4, generator=g), 3, ["2"]),
    "reused_linear": (ReusedLinear, lambda b, g: torch.randn(b, 4, generator=g), 3, ["shared"]),
}
HEADS = {"tiny_transformer": "head", "mha": "head", "reused_linear": "head"}
# method="fast" must refuse (ValueError) rather than be inexact: MHA returns a tuple
FAST_REFUSES = {"mha"}
BATCHES = [1, 5]


def make(arch: str, batch: int):
    """A fresh float64 model (eval mode unless noted) and a fixed batch."""
    factory, inputs_fn, classes, layers = ARCHS[arch]
    torch.manual_seed(1234 + len(arch))
    model = factory().double()
    model.eval()
    g = torch.Generator().manual_seed(99 + batch)
    x = inputs_fn(batch, g)
    if x.is_floating_point():
        x = x.double()
    y = torch.randint(0, max(classes, 2), (batch,), generator=g)
    return model, x, y, classes, layers


def head_name(model: nn.Module, arch: str) -> str:
    if arch in HEADS:
        return HEADS[arch]
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


# --------------------------------------------------------------------------- naive reference


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def block_of(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def logit_quantities(z: torch.Tensor, t: int, binary: bool):
    """loss, margin, logit scale and δ = ∂ℓ/∂z for ONE example's logits ``z`` (shape [C])."""
    if binary:
        f = z.reshape(())
        s = 2.0 * t - 1.0
        loss = F.softplus(-s * f)
        margin = s * f
        scale = torch.sigmoid(-s * f)
        delta = (-s * torch.sigmoid(-s * f)).reshape(1)
    else:
        loss = torch.logsumexp(z, 0) - z[t]
        others = torch.cat([z[:t], z[t + 1:]])
        margin = z[t] - others.max()
        delta = torch.softmax(z, 0) - F.one_hot(torch.tensor(t), z.numel()).to(z.dtype)
        scale = delta.norm()
    return loss, margin, scale, delta


def single(model, x_i, t, binary, head, layers):
    """Every per-example quantity of one example at the model's current parameters."""
    acts, called = {}, set()
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_pre_hook(
        lambda m, inp, name=name: acts.setdefault(name, []).append(inp[0].detach()))
        for name in {head, *layers}]
    hooks += [mod.register_forward_pre_hook(lambda m, inp, name=name: called.add(name))
              for name, mod in modules.items()]
    try:
        z = model(x_i.unsqueeze(0)).reshape(-1)
    finally:
        for h in hooks:
            h.remove()
    names, params = zip(*trainable(model))
    loss, margin, scale, delta = logit_quantities(z, t, binary)
    rows = []
    for c in range(z.numel()):
        gs = torch.autograd.grad(z[c], params, retain_graph=True, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)])
    jac = {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(names)}  # [C, *shape]
    grad_auto = torch.autograd.grad(loss, params, allow_unused=True)
    grad = {n: torch.zeros_like(p) if g is None else g
            for n, g, p in zip(names, grad_auto, params)}
    # self-check of the reference: autograd's ∇ℓ equals J^T δ
    d = delta.detach()
    for n in names:
        jtd = torch.tensordot(d, jac[n], dims=1)
        assert torch.allclose(jtd, grad[n], rtol=1e-10, atol=1e-13), n
    blocks = {}
    for n in names:
        blk = block_of(n)
        while blk not in called:  # e.g. MHA's out_proj: its weight is used by MHA's forward
            blk = blk.rpartition(".")[0]
        blocks[blk] = blocks.get(blk, 0.0) + jac[n].pow(2).sum()
    return {
        "loss": loss.detach(), "margin": margin.detach(), "logit_scale": scale.detach(),
        "delta": d, "z": z.detach(),
        "jacobian_norm": sum(j.pow(2).sum() for j in jac.values()).sqrt(),
        "jacobian_norm_block": {k: v.sqrt() for k, v in blocks.items()},
        "grad": grad,
        "grad_norm": sum(g.pow(2).sum() for g in grad.values()).sqrt(),
        # a module called several times: the norm of all its inputs together
        "act": {k: torch.sqrt(sum(a.pow(2).sum() for a in v)) for k, v in acts.items()},
    }


def groups(batch: int, m):
    m = batch if m is None else m
    return [list(range(s, min(s + m, batch))) for s in range(0, batch, m)]


def group_epsilon(model, x, y, idx, binary, rho):
    """ε_g = ρ ∇L_g / ‖∇L_g‖ with L_g the group's mean loss (loop over its examples)."""
    names, params = zip(*trainable(model))
    total = 0.0
    for i in idx:
        z = model(x[i:i + 1]).reshape(-1)
        total = total + logit_quantities(z, int(y[i]), binary)[0]
    gs = torch.autograd.grad(total / len(idx), params)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in gs))
    return {n: rho * g / norm for n, g in zip(names, gs)}


def shifted(model, eps):
    out = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in out.named_parameters():
            if n in eps:
                p.add_(eps[n])
    return out


@cache
def reference(arch: str, batch: int, m):
    """Per-example quantities at w and at w + ε_g(i), ε per group, and the four update rules."""
    model, x, y, classes, layers = make(arch, batch)
    binary = classes == 1
    head = head_name(model, arch)
    names = [n for n, _ in trainable(model)]
    at_w, at_eps, epsilons = [], [None] * batch, []
    for i in range(batch):
        at_w.append(single(model, x[i], int(y[i]), binary, head, layers))
    upd = {v: {n: torch.zeros_like(p) for n, p in trainable(model)}
           for v in ("sgd", "sam", "lsam", "jsam")}
    for idx in groups(batch, m):
        eps = group_epsilon(model, x, y, idx, binary, RHO)
        epsilons.append(eps)
        moved = shifted(model, eps)
        mp = dict(moved.named_parameters())
        for i in idx:
            at_eps[i] = single(moved, x[i], int(y[i]), binary, head, layers)
            # SGD / SAM: the plain gradients at w and at w + ε
            for n in names:
                upd["sgd"][n] += at_w[i]["grad"][n] / batch
                upd["sam"][n] += at_eps[i]["grad"][n] / batch
            # L-SAM: VJP at w with the detached cotangent δ_i(w + ε)
            z = model(x[i:i + 1]).reshape(-1)
            g = torch.autograd.grad(z, [p for _, p in trainable(model)],
                                    grad_outputs=at_eps[i]["delta"], allow_unused=True)
            for n, gn in zip(names, g):
                if gn is not None:
                    upd["lsam"][n] += gn / batch
            # J-SAM: VJP at w + ε with the detached cotangent δ_i(w)
            z = moved(x[i:i + 1]).reshape(-1)
            g = torch.autograd.grad(z, [mp[n] for n in names],
                                    grad_outputs=at_w[i]["delta"], allow_unused=True)
            for n, gn in zip(names, g):
                if gn is not None:
                    upd["jsam"][n] += gn / batch
    return {"w": at_w, "eps": at_eps, "epsilons": epsilons, "updates": upd, "head": head,
            "layers": layers, "binary": binary}


# --------------------------------------------------------------------------- comparison helpers


def rel_err(actual, expected) -> float:
    """Element-wise relative error (scalars/per-example values)."""
    a = torch.as_tensor(actual, dtype=torch.float64).reshape(-1)
    e = torch.as_tensor(expected, dtype=torch.float64).reshape(-1)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(((a - e).abs() / e.abs().clamp_min(1e-12)).max())


def tensor_rel_err(actual, expected) -> float:
    """Relative error of a parameter-shaped tensor: max |a - e| / max |e|."""
    e = expected.detach().double()
    scale = float(e.abs().max())
    return float((actual.detach().double() - e).abs().max()) / max(scale, 1e-300)


def check(actual, expected, what):
    err = rel_err(actual, expected)
    assert err <= RTOL, f"{what}: relative error {err:.3e}\nlib={actual}\nref={expected}"
    return err


def stack(ref_points, key):
    return torch.stack([r[key] for r in ref_points])


def state_of(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.training,
            [p.requires_grad for p in model.parameters()])


# --------------------------------------------------------------------------- tests

CASES = [(a, b) for a in ARCHS for b in BATCHES]
IDS = [f"{a}-B{b}" for a, b in CASES]


@pytest.mark.parametrize("method", ["auto", "exact"])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("arch,batch", CASES, ids=IDS)
def test_probe_matches_reference(arch, batch, m, method):
    ref = reference(arch, batch, m)
    model, x, y, classes, layers = make(arch, batch)
    if arch == "dropout_mlp":
        model.train()  # the probe must measure in eval mode and leave the mode alone
    before = state_of(model)
    rng = torch.get_rng_state()
    kwargs = {"head": HEADS[arch]} if arch in HEADS else {}
    ds = sd.Probe(model, layers=[ref["head"], *layers], method=method, per_block=True,
                  **kwargs).measure(x, y, rho=RHO, m=m)
    for view, points in (("sgd", ref["w"]), ("sam", ref["eps"])):
        for key in ("loss", "margin", "logit_scale", "jacobian_norm", "grad_norm"):
            lib = torch.from_numpy(ds[key].sel(view=view).values)
            check(lib, stack(points, key), f"{view}/{key}")
        for layer in [ref["head"], *layers]:
            lib = torch.from_numpy(ds["activation_norm"].sel(view=view, layer=layer).values)
            check(lib, torch.stack([p["act"][layer] for p in points]),
                  f"{view}/activation_norm[{layer}]")
        blocks = points[0]["jacobian_norm_block"].keys()
        assert set(ds["block"].values.tolist()) == set(blocks)
        for blk in blocks:
            lib = torch.from_numpy(ds["jacobian_norm_block"].sel(view=view, block=blk).values)
            check(lib, torch.stack([p["jacobian_norm_block"][blk] for p in points]),
                  f"{view}/jacobian_norm_block[{blk}]")
    head_w = dict(model.named_modules())[ref["head"]].weight
    check(float(ds["last_layer_weight_norm"]), head_w.detach().norm(), "last_layer_weight_norm")
    after = state_of(model)
    assert after[1] == before[1] and after[2] == before[2]
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize("method", ["auto", "exact", "fast"])
@pytest.mark.parametrize("arch,batch", CASES, ids=IDS)
def test_jacobian_and_grad_norms(arch, batch, method):
    ref = reference(arch, batch, 1)
    model, x, y, *_ = make(arch, batch)
    if arch == "dropout_mlp":
        model.train()
    if method == "fast" and arch in FAST_REFUSES:
        with pytest.raises(ValueError, match="exact"):
            sd.jacobian_norms(model, x, method=method)
        return
    jn = sd.jacobian_norms(model, x, method=method)
    check(jn, stack(ref["w"], "jacobian_norm"), "jacobian_norms")
    blocks = sd.jacobian_norms(model, x, method=method, per_block=True)
    assert set(blocks) == set(ref["w"][0]["jacobian_norm_block"])
    for blk, val in blocks.items():
        check(val, torch.stack([p["jacobian_norm_block"][blk] for p in ref["w"]]),
              f"jacobian_norms[{blk}]")
    gn = sd.grad_norms(model, x, y, method=method)
    check(gn, stack(ref["w"], "grad_norm"), "grad_norms")
    assert model.training == (arch == "dropout_mlp")


@pytest.mark.parametrize("m", [1, 3, None])
@pytest.mark.parametrize("arch,batch", CASES, ids=IDS)
def test_sam_epsilon(arch, batch, m):
    ref = reference(arch, batch, m)
    model, x, y, *_ = make(arch, batch)
    eps = sd.sam_epsilon(model, x, y, rho=RHO, m=m)
    names = [n for n, _ in trainable(model)]
    assert set(names) <= set(eps)
    for n, e in eps.items():
        assert e.shape[0] == len(ref["epsilons"])
        for g, ref_eps in enumerate(ref["epsilons"]):
            if n in ref_eps:
                err = tensor_rel_err(e[g], ref_eps[n])
                assert err <= RTOL, (n, g, err)
            else:  # frozen
                assert torch.count_nonzero(e[g]) == 0, n


SAM_CASES = [(1, "auto"), (1, "fast"), (1, "exact"), (3, "auto"), (None, "auto")]


@pytest.mark.parametrize("variant", ["sam", "lsam", "jsam"])
@pytest.mark.parametrize("m,method", SAM_CASES, ids=[f"m{m}-{me}" for m, me in SAM_CASES])
@pytest.mark.parametrize("arch,batch", CASES, ids=IDS)
def test_sam_step_matches_reference(arch, batch, m, method, variant):
    ref = reference(arch, batch, m)
    model, x, y, *_ = make(arch, batch)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers0 = {n: b.clone() for n, b in model.named_buffers()}
    base = torch.optim.SGD(model.parameters(), lr=LR)
    opt = sd.SAM(model, base, rho=RHO, m=m, variant=variant, method=method)
    if method == "fast" and arch in FAST_REFUSES:
        with pytest.raises(ValueError, match="exact"):
            opt.step(x, y)
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), w0[n]), f"{n} changed by a refused step"
        return
    loss = opt.step(x, y)
    check(loss, stack(ref["w"], "loss").mean(), "returned loss at w")
    expected = ref["updates"][variant]
    for n, p in model.named_parameters():
        if n in expected:
            step = (w0[n] - p.detach()) / LR
            err = tensor_rel_err(step, expected[n])
            assert err <= RTOL, f"{variant} update of {n}: relative error {err:.3e}"
        else:
            assert torch.equal(p.detach(), w0[n]), f"frozen {n} moved"
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers0[n]), n


def test_variants_differ_from_sgd():
    """Guard against a vacuous reference: the four rules give distinct updates."""
    upd = reference("mlp_gelu_ln", 5, 1)["updates"]
    for a in upd:
        for b in upd:
            if a < b:
                diff = max(tensor_rel_err(upd[a][n], upd[b][n]) for n in upd[a])
                assert diff > 1e-3, (a, b, diff)

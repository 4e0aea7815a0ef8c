"""The SAM family and regularized SGD against naive references (float64)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from problems import PROBLEMS, make
from reference import loss_one, trainable
from torch import nn

import sam_diagnostics as sd

BY_NAME = {p.name: p for p in PROBLEMS}
OPT_PROBLEMS = [BY_NAME[n] for n in ("mlp", "cnn2d", "resnet_ln", "frozen", "binary",
                                     "custom_param", "sequence", "tied")]


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def naive_gradient(model, x, y, rho, m, variant):
    """Python loop over groups and examples, autograd at w and at w + ε_g, rule assembled by
    hand (SPEC 2.2)."""
    B = x.shape[0]
    m = B if m is None else m
    total = [torch.zeros_like(p) for p in trainable(model)]
    for start in range(0, B, m):
        idx = range(start, min(start + m, B))
        lg = torch.stack([loss_one(model(x[i : i + 1]), y[i : i + 1]) for i in idx]).mean()
        g = torch.autograd.grad(lg, trainable(model), allow_unused=True, materialize_grads=True)
        norm = flat(g).norm()
        pert = copy.deepcopy(model)
        with torch.no_grad():
            for p, v in zip(trainable(pert), g):
                p.add_(rho * v / norm)
        for i in idx:
            z_w = model(x[i : i + 1])
            z_p = pert(x[i : i + 1])
            if variant == "sam":
                gi = torch.autograd.grad(loss_one(z_p, y[i : i + 1]), trainable(pert),
                                         allow_unused=True, materialize_grads=True)
            else:
                zw = z_w.detach().requires_grad_(True)
                zp = z_p.detach().requires_grad_(True)
                (d_w,) = torch.autograd.grad(loss_one(zw, y[i : i + 1]), zw)
                (d_p,) = torch.autograd.grad(loss_one(zp, y[i : i + 1]), zp)
                if variant == "lsam":   # J(w)^T δ(w + ε)
                    gi = torch.autograd.grad(z_w, trainable(model), d_p, allow_unused=True,
                                             materialize_grads=True)
                else:                   # J(w + ε)^T δ(w)
                    gi = torch.autograd.grad(z_p, trainable(pert), d_w, allow_unused=True,
                                             materialize_grads=True)
            for t, v in zip(total, gi):
                t += v
    return [t / B for t in total]


@pytest.mark.parametrize("problem", OPT_PROBLEMS, ids=lambda p: p.name)
@pytest.mark.parametrize("variant", sd.optim.VARIANTS)
@pytest.mark.parametrize("m", [1, 2, None])
def test_update_matches_naive(problem, variant, m):
    model, x, y = make(problem, batch=5)
    ref_model = copy.deepcopy(model)
    expected = naive_gradient(ref_model, x, y, 0.2, m, variant)
    lr = 0.1
    opt = sd.SAM(model, torch.optim.SGD(model.parameters(), lr=lr), rho=0.2, m=m,
                 variant=variant)
    before = [p.detach().clone() for p in trainable(model)]
    opt.step(x, y)
    after = [p.detach() for p in trainable(model)]
    got = [(b - a) / lr for a, b in zip(after, before)]
    torch.testing.assert_close(flat(got), flat(expected), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("variant", sd.optim.VARIANTS)
def test_fast_and_torch_func_paths_agree(variant):
    model, x, y = make(BY_NAME["sequence"], batch=6)
    fast = sd.SAM(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.1, 1, variant,
                  method="fast").gradient(x, y)[0]
    func = sd.SAM(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.1, 1, variant,
                  method="exact").gradient(x, y)[0]
    for n in fast:
        torch.testing.assert_close(fast[n], func[n], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("variant", sd.optim.VARIANTS)
@pytest.mark.parametrize("m", [1, 3, None])
def test_rho_zero_is_the_base_step(variant, m):
    model, x, y = make(BY_NAME["cnn2d"], batch=6)
    twin = copy.deepcopy(model)
    sd.SAM(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 0.0, m,
           variant).step(x, y)
    base = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(twin(x), y).backward()
    base.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def two_layer(binary, seed=0):
    torch.manual_seed(seed)
    d, h = 5, 4
    c = 1 if binary else 3
    net = nn.Sequential(nn.Linear(d, h, bias=False), nn.Linear(h, c, bias=False)).double()
    x = torch.randn(8, d, dtype=torch.float64)
    y = torch.randint(0, 2 if binary else 3, (8,))
    return net, x, y


@pytest.mark.parametrize("binary", [True, False])
def test_jsam_is_sgd_on_regularized_objective_two_layer_linear(binary):
    """SPEC 2.5: J-SAM (m = 1) on f = V W x equals SGD on ℓ + (stop-grad coefficient) ·
    ½(‖x‖²‖Vᵀδ‖² + ‖δ‖²‖Wx‖²) — exactly, since f is bilinear."""
    net, x, y = two_layer(binary)
    rho = 0.3
    got = sd.SAM(net, torch.optim.SGD(net.parameters(), lr=1.0), rho, 1, "jsam").gradient(x, y)[0]
    W, V = net[0].weight, net[1].weight
    total = 0.0
    for i in range(x.shape[0]):
        xi = x[i]
        z = V @ (W @ xi)
        loss = loss_one(z[None], y[i : i + 1])
        if binary:
            s = 2.0 * y[i] - 1
            lam = rho * torch.sigmoid(-s * z[0]) / torch.sqrt(
                (W @ xi).pow(2).sum() + xi.pow(2).sum() * V.pow(2).sum())
            reg = lam.detach() * 0.5 * (xi.pow(2).sum() * V.pow(2).sum() + (W @ xi).pow(2).sum())
        else:
            d = (torch.softmax(z, 0) - F.one_hot(y[i], 3)).detach()
            N = torch.sqrt(d.pow(2).sum() * (W @ xi).pow(2).sum()
                           + (V.T @ d).pow(2).sum() * xi.pow(2).sum()).detach()
            reg = rho / N * 0.5 * (xi.pow(2).sum() * (V.T @ d).pow(2).sum()
                                   + d.pow(2).sum() * (W @ xi).pow(2).sum())
        total = total + loss + reg
    expected = torch.autograd.grad(total / x.shape[0], [W, V])
    torch.testing.assert_close(got["0.weight"], expected[0], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(got["1.weight"], expected[1], rtol=1e-8, atol=1e-12)


def test_linear_logistic_sam_logit_scale_closed_form():
    """SPEC 2.4: with f = wᵀx, 1-SAM's logit scale is σ(ρ‖x‖ − margin)."""
    torch.manual_seed(0)
    net = nn.Linear(6, 1, bias=False).double()
    x = torch.randn(20, 6, dtype=torch.float64)
    y = torch.randint(0, 2, (20,))
    rho = 0.4
    ds = sd.Probe(net).measure(x, y, rho=rho, m=1)
    mgn = torch.as_tensor(ds["margin"].sel(view="sgd").values)
    expected = torch.sigmoid(rho * x.norm(dim=1) - mgn)
    torch.testing.assert_close(torch.as_tensor(ds["logit_scale"].sel(view="sam").values),
                               expected, rtol=1e-10, atol=1e-12)
    ratio = expected / torch.sigmoid(-mgn)
    assert torch.all(ratio > 1) and torch.all(ratio < torch.exp(rho * x.norm(dim=1)))


def test_base_optimizer_state_matches_given_the_same_gradients():
    model, x, y = make(BY_NAME["mlp"], batch=8)
    twin = copy.deepcopy(model)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    sam = sd.SAM(model, torch.optim.SGD(model.parameters(), **kw), 0.1, 1, "sam")
    base = torch.optim.SGD(twin.parameters(), **kw)
    probe_sam = sd.SAM(twin, torch.optim.SGD(twin.parameters(), lr=0.0), 0.1, 1, "sam")
    for k in range(3):
        xk, yk = x.roll(k, 0), y.roll(k, 0)
        grads = probe_sam.gradient(xk, yk)[0]
        for n, p in twin.named_parameters():
            p.grad = grads[n]
        base.step()
        sam.step(xk, yk)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sam.base_optimizer.state[a]["momentum_buffer"],
                                   base.state[b]["momentum_buffer"], rtol=1e-10, atol=1e-12)


def test_two_call_api_equals_batch_sam_and_restores_weights():
    model, x, y = make(BY_NAME["resnet_ln"], batch=6)
    twin = copy.deepcopy(model)
    sd.SAM(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.1, None).step(x, y)
    opt = sd.SAM(twin, torch.optim.SGD(twin.parameters(), lr=0.1), 0.1)
    w = [p.detach().clone() for p in twin.parameters()]
    F.cross_entropy(twin(x), y).backward()
    opt.first_step(zero_grad=True)
    assert not all(torch.equal(a, b) for a, b in zip(w, twin.parameters()))
    F.cross_entropy(twin(x), y).backward()
    opt.second_step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_adaptive_sam_matches_naive_asam():
    model, x, y = make(BY_NAME["mlp"], batch=4)
    got = sd.SAM(model, torch.optim.SGD(model.parameters(), lr=1.0), 0.1, 1, "sam",
                 adaptive=True).gradient(x, y)[0]
    ps = trainable(model)
    exp = [torch.zeros_like(p) for p in ps]
    for i in range(4):
        g = torch.autograd.grad(loss_one(model(x[i : i + 1]), y[i : i + 1]), ps)
        norm = flat([p.abs() * v for p, v in zip(ps, g)]).norm()
        pert = copy.deepcopy(model)
        with torch.no_grad():
            for p, q, v in zip(trainable(pert), ps, g):
                p.add_(0.1 * q.pow(2) * v / norm)
        gi = torch.autograd.grad(loss_one(pert(x[i : i + 1]), y[i : i + 1]), trainable(pert))
        for e, v in zip(exp, gi):
            e += v / 4
    torch.testing.assert_close(flat(got.values()), flat(exp), rtol=1e-8, atol=1e-12)


def test_batchnorm_running_stats_not_updated_by_perturbed_pass():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    twin = copy.deepcopy(net)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    sd.SAM(net, torch.optim.SGD(net.parameters(), lr=0.0), 0.1, None).step(x, y)
    twin(x)  # one plain forward in train mode
    torch.testing.assert_close(net[1].running_mean, twin[1].running_mean, rtol=0, atol=0)
    assert net[1].num_batches_tracked == 1
    with pytest.raises(ValueError, match="BatchNorm.*GroupNorm"):
        sd.SAM(net, torch.optim.SGD(net.parameters(), lr=0.1), 0.1, m=1).step(x, y)


def test_regularized_sgd_matches_hand_written_objective():
    model, x, y = make(BY_NAME["resnet_ln"], batch=6)
    twin = copy.deepcopy(model)
    opt = sd.RegularizedSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.03, 0.02)
    opt.step(x, y)
    a = twin.blocks(twin.stem(x))
    loss = (F.cross_entropy(twin.classifier(a), y) + 0.03 * a.pow(2).sum(1).mean()
            + 0.02 * twin.classifier.weight.pow(2).sum())
    loss.backward()
    torch.optim.SGD(twin.parameters(), lr=0.1).step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sd.optim.OPTIMIZERS)
def test_make_optimizer_steps_every_method(name):
    model, x, y = make(BY_NAME["mlp"], batch=8)
    opt = sd.make_optimizer(name, model, lr=0.05, rho=0.05, m=1)
    w = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert not all(torch.equal(a, b) for a, b in zip(w, model.parameters()))


@pytest.mark.parametrize("kwargs, match", [
    (dict(rho=-0.1), "rho"),
    (dict(m=0), "m must"),
    (dict(m=1.5), "m must"),
    (dict(variant="xsam"), "variant"),
    (dict(method="slow"), "method"),
])
def test_bad_configuration(kwargs, match):
    net = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=match):
        sd.SAM(net, torch.optim.SGD(net.parameters(), lr=0.1), **kwargs)


def test_bad_inputs():
    net = nn.Linear(3, 2)
    opt = sd.SAM(net, torch.optim.SGD(net.parameters(), lr=0.1), m=1)
    with pytest.raises(ValueError, match="targets must"):
        opt.step(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        opt.step(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(TypeError, match="integer"):
        opt.step(torch.randn(4, 3), torch.zeros(4))
    with pytest.raises(TypeError, match="base_optimizer"):
        sd.SAM(net, "sgd")
    other = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="not the model"):
        sd.SAM(net, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="per-example"):
        sd.SAM(net, torch.optim.SGD(net.parameters(), lr=0.1), m=1,
               loss_fn=F.cross_entropy).step(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


def test_adamw_base_and_scheduler_work_unchanged():
    """SAM only supplies the gradient: AdamW's state and a scheduler behave as with plain
    AdamW given the same gradients."""
    model, x, y = make(BY_NAME["resnet_ln"], batch=6)
    twin = copy.deepcopy(model)
    opt = sd.SAM(model, torch.optim.AdamW(model.parameters(), lr=1e-2), 0.1, 1, "jsam")
    sched = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.5)
    base = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    sched_twin = torch.optim.lr_scheduler.StepLR(base, step_size=1, gamma=0.5)
    grad_of = sd.SAM(twin, torch.optim.SGD(twin.parameters(), lr=0.0), 0.1, 1, "jsam")
    for _ in range(3):
        grads = grad_of.gradient(x, y)[0]
        for n, p in twin.named_parameters():
            p.grad = grads[n]
        base.step()
        sched_twin.step()
        opt.step(x, y)
        sched.step()
    assert opt.param_groups[0]["lr"] == base.param_groups[0]["lr"] == 1e-2 / 8
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(opt.base_optimizer.state[a]["exp_avg_sq"],
                                   base.state[b]["exp_avg_sq"], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("name", ["cnn2d", "sequence"])
def test_chunked_passes_give_the_same_numbers(name, monkeypatch):
    """Passes run on chunks of examples under a memory budget: exact (examples independent)."""
    from sam_diagnostics import engine

    model, x, y = make({p.name: p for p in PROBLEMS}[name], batch=7)
    whole = (sd.jacobian_norms(model, x), sd.Probe(model).measure(x, y, rho=0.1),
             sd.SAM(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.1, 1).gradient(x, y))
    monkeypatch.setitem(engine.CHUNK_ELEMENTS, "cpu", 1)  # one example per chunk
    assert len(sd.Engine(model).chunks(sd.Engine(model).plan(x), 7)) == 7
    torch.testing.assert_close(sd.jacobian_norms(model, x), whole[0])
    ds = sd.Probe(model).measure(x, y, rho=0.1)
    for v in ds.data_vars:
        np.testing.assert_allclose(ds[v].values, whole[1][v].values, rtol=1e-12, atol=1e-14)
    g, loss = sd.SAM(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.1, 1).gradient(x, y)
    torch.testing.assert_close(loss, whole[2][1])
    for n in g:
        torch.testing.assert_close(g[n], whole[2][0][n])


def test_batch_sam_under_autocast_evaluates_the_perturbed_weights():
    """autocast caches the low-precision copy of each weight inside its region: the in-place
    w + ε of batch SAM must not be served the cached copy of w (then SAM = SGD silently)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))

    def step(variant_rho):
        model = copy.deepcopy(net)
        opt = sd.SAM(model, torch.optim.SGD(model.parameters(), lr=1.0), variant_rho, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            opt.step(x, y)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    sam, sgd = step(0.5), step(0.0)
    assert (sam - sgd).abs().max() > 1e-2  # the perturbation took effect under autocast

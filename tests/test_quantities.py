"""Every per-example quantity against a naive per-example autograd loop (float64)."""

import copy

import numpy as np
import pytest
import torch
from problems import PROBLEMS, make
from reference import eps_one, jac_sq_one, perturbed_copy, quantities_one, trainable
from torch import nn

import sam_diagnostics as sd
from sam_diagnostics.norms import find_head

RTOL = 1e-6
IDS = [p.name for p in PROBLEMS]


def close(a, b, rtol=RTOL):
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    torch.testing.assert_close(a, b, rtol=rtol, atol=1e-10)


@pytest.mark.parametrize("problem", PROBLEMS, ids=IDS)
@pytest.mark.parametrize("method", ["auto", "exact", "fast"])
def test_jacobian_norms_match_naive(problem, method):
    model, x, _ = make(problem)
    ref = torch.stack([jac_sq_one(model, x[i]) for i in range(x.shape[0])]).sqrt()
    if method == "fast" and problem.name == "tied":
        with pytest.raises(ValueError, match="tied"):
            sd.jacobian_norms(model, x, method)
        return
    close(sd.jacobian_norms(model, x, method), ref)


@pytest.mark.parametrize("problem", PROBLEMS, ids=IDS)
def test_grad_norms_match_naive(problem):
    from reference import grad_one

    model, x, y = make(problem)
    ref = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in grad_one(model, x[i], y[i])))
                       for i in range(x.shape[0])])
    close(sd.grad_norms(model, x, y), ref)
    close(sd.grad_norms(model, x, y, "exact"), ref)


@pytest.mark.parametrize("problem", PROBLEMS, ids=IDS)
def test_probe_both_views_match_naive(problem):
    model, x, y = make(problem)
    rho = 0.3
    ds = sd.Probe(model).measure(x, y, rho=rho, m=1)
    head = dict(model.named_modules())[find_head(model, x)]
    for i in range(x.shape[0]):
        sgd = quantities_one(model, x[i], y[i], head)
        pert = perturbed_copy(model, eps_one(model, x[i], y[i], rho))
        phead = dict(pert.named_modules())[ds.attrs["head"]]
        sam = quantities_one(pert, x[i], y[i], phead)
        for view, ref in (("sgd", sgd), ("sam", sam)):
            got = ds.sel(view=view).isel(example=i)
            for name in ("loss", "jacobian_norm", "grad_norm"):
                close(float(got[name]), ref[name])
            close(float(got["activation_norm"].isel(layer=0)), ref["activation_norm"])
            z = ref["logits"].reshape(-1)
            close(float(got["logit_scale"]), sd.logit_scale(z[None] if z.numel() > 1 else z,
                                                            y[i : i + 1]))


@pytest.mark.parametrize("method", ["fast", "exact"])
@pytest.mark.parametrize("m", [2, None])
def test_probe_group_views(method, m):
    problem = PROBLEMS[0]
    model, x, y = make(problem, batch=5)
    rho = 0.2
    ds = sd.Probe(model, method=method).measure(x, y, rho=rho, m=m)
    eps = sd.sam_epsilon(model, x, y, rho, m)
    for g, s in enumerate(sd.group_slices(5, m)):
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for (n, p) in ref.named_parameters():
                p.add_(eps[n][g])
        for i in range(s.start, s.stop):
            q = quantities_one(ref, x[i], y[i], ref[4])
            got = ds.sel(view="sam").isel(example=i)
            close(float(got["loss"]), q["loss"])
            close(float(got["jacobian_norm"]), q["jacobian_norm"])


def test_sam_epsilon_matches_naive():
    model, x, y = make(PROBLEMS[4])  # frozen parameters get no ε
    eps = sd.sam_epsilon(model, x, y, rho=0.1, m=1)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(eps) == names
    for i in range(x.shape[0]):
        for n, e in zip(names, eps_one(model, x[i], y[i], 0.1)):
            close(eps[n][i], e)
    total = sum(v.flatten(1).pow(2).sum(1) for v in eps.values()).sqrt()
    close(total, torch.full((x.shape[0],), 0.1))


def test_rho_zero_views_equal():
    model, x, y = make(PROBLEMS[1])
    ds = sd.Probe(model).measure(x, y, rho=0.0)
    for name in ("loss", "jacobian_norm", "grad_norm", "activation_norm"):
        close(ds[name].sel(view="sam").values, ds[name].sel(view="sgd").values)


def test_per_block_norms_sum_to_total():
    model, x, y = make(PROBLEMS[3])
    blocks = sd.jacobian_norms(model, x, per_block=True)
    total = sd.jacobian_norms(model, x)
    close(torch.sqrt(sum(v.pow(2) for v in blocks.values())), total)
    assert "classifier" in blocks
    # the head's weight block is sqrt(C) * ||a||: SPEC 2.3
    model.classifier.bias.requires_grad_(False)
    blocks = sd.jacobian_norms(model, x, per_block=True)
    ds = sd.Probe(model).measure(x, y, rho=0.1)
    close(blocks["classifier"], 2.0 * torch.as_tensor(ds["activation_norm"].sel(view="sgd")
                                                      .isel(layer=0).values))


def test_hutchinson_is_unbiased():
    model, x, _ = make(PROBLEMS[0])
    exact = sd.jacobian_norms(model, x, "exact")
    est = sd.jacobian_norms(model, x, "hutchinson", num_probes=4000,
                            generator=torch.Generator().manual_seed(1))
    assert torch.all((est - exact).abs() / exact < 0.05)
    one = sd.jacobian_norms(model, x, "hutchinson", num_probes=1,
                            generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(one, exact)


def test_float32_agrees_with_float64():
    model, x, y = make(PROBLEMS[1])
    ref = sd.jacobian_norms(model, x)
    got = sd.jacobian_norms(model.float(), x.float())
    assert got.dtype == torch.float32
    close(got, ref, rtol=1e-4)


def test_weight_norms():
    model, x, y = make(PROBLEMS[3])
    ds = sd.Probe(model).measure(x, y, rho=0.1)
    close(float(ds["last_layer_weight_norm"]), model.classifier.weight.norm())
    close(float(ds["weight_norm"].sel(module="stem")), model.stem.weight.norm())


def test_logit_terms_closed_forms():
    z = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    delta = torch.softmax(z, 1) - torch.nn.functional.one_hot(y, 3)
    close(sd.logit_term(z, y), delta)
    close(sd.logit_scale(z, y), delta.norm(dim=1))
    close(sd.margin(z, y), torch.tensor([1.5, 0.0]))
    # binary: σ(−s f), and for C = 2 the multiclass scale is √2 σ(−margin)
    f = torch.tensor([1.0, -2.0, 0.3], dtype=torch.float64)
    t = torch.tensor([1, 1, 0])
    s = 2 * t - 1
    close(sd.logit_scale(f, t), torch.sigmoid(-s * f))
    close(sd.logit_scale(f[:, None], t), torch.sigmoid(-s * f))
    close(sd.margin(f, t), s * f)
    z2 = torch.stack([torch.zeros(3, dtype=torch.float64), f], 1)
    close(sd.logit_scale(z2, t), 2**0.5 * torch.sigmoid(-sd.margin(z2, t)))
    close(sd.per_example_loss(f, t), torch.nn.functional.softplus(-s * f))


def test_gradient_of_loss_is_logit_term():
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, 2, 2])
    (g,) = torch.autograd.grad(sd.per_example_loss(z, y).sum(), z)
    close(g, sd.logit_term(z, y))


def test_trainable_helper_consistency():
    model, _, _ = make(PROBLEMS[4])
    assert len(trainable(model)) == 3
    assert isinstance(model, nn.Module)


def test_logit_scale_keeps_relative_precision_on_confident_examples():
    """Regression: σ(f) − 1 and softmax − onehot cancel for large margins (found by the
    linear-logistic analysis: ratios became NaN/inf on confident clean examples)."""
    f = torch.tensor([8.0, 12.0, 17.0, 40.0])
    torch.testing.assert_close(sd.logit_scale(f, torch.ones(4, dtype=torch.long)),
                               torch.sigmoid(-f), rtol=1e-6, atol=0)
    z = torch.tensor([[20.0, 0.0, 0.0], [60.0, 1.0, -2.0]])
    y = torch.tensor([0, 0])
    p = torch.softmax(z.double(), 1)
    expected = torch.sqrt((1 - p[:, 0]) ** 2 + p[:, 1] ** 2 + p[:, 2] ** 2)
    expected[0] = (6 ** 0.5) * torch.exp(torch.tensor(-20.0, dtype=torch.float64))
    tail = torch.exp(torch.tensor([-59.0, -62.0], dtype=torch.float64))
    expected[1] = torch.sqrt(tail.sum() ** 2 + (tail ** 2).sum())
    torch.testing.assert_close(sd.logit_scale(z, y).double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("m", [1, 2, None])
def test_probe_shows_the_asam_view(m):
    """``Probe.measure(adaptive=True)`` evaluates at ASAM's ε (the view an ``adaptive=True``
    optimizer takes); checked example by example against ``sam_epsilon`` + ``perturbed``."""
    from problems import PROBLEMS, make

    model, x, y = make({p.name: p for p in PROBLEMS}["mlp"], batch=4)
    ds = sd.Probe(model).measure(x, y, rho=0.3, m=m, adaptive=True)
    eps = sd.sam_epsilon(model, x, y, rho=0.3, m=m, adaptive=True)
    for g, s in enumerate(sd.group_slices(4, m)):
        with sd.perturbed(model, {n: e[g] for n, e in eps.items()}):
            want = sd.per_example_loss(model(x[s]), y[s])
        got = torch.from_numpy(ds["loss"].sel(view="sam").values[s])
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    plain = sd.Probe(model).measure(x, y, rho=0.3, m=m)
    assert not np.allclose(plain["loss"].sel(view="sam"), ds["loss"].sel(view="sam"))

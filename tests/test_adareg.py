"""The J-SAM-matched adaptive regularizer ("adareg", AdaptiveRegularizedSGD).

Its step must equal the 1-SAM J-SAM step exactly where the derivation is exact: a two-layer
linear network (SPEC 2.5), and the top two layers of a ReLU MLP when only they are perturbed.
"""

import copy

import pytest
import torch
from torch import nn

import sam_diagnostics as sd
from sam_diagnostics.optim import AdaptiveRegularizedSGD, make_optimizer


def _update(model, make, x, y):
    """Parameter change of one step with plain SGD (lr 1, no momentum): minus the gradient."""
    before = [p.detach().clone() for p in model.parameters()]
    make(model).step(x, y)
    return [(p.detach() - b) for p, b in zip(model.parameters(), before)]


def _pair(model, x, y, rho):
    def jsam(m):
        params = [p for p in m.parameters() if p.requires_grad]
        return sd.SAM(m, torch.optim.SGD(params, lr=1.0), rho=rho, m=1, variant="jsam")

    def ada(m):
        params = [p for p in m.parameters() if p.requires_grad]
        return AdaptiveRegularizedSGD(m, torch.optim.SGD(params, lr=1.0), rho=rho)

    return _update(copy.deepcopy(model), jsam, x, y), _update(copy.deepcopy(model), ada, x, y)


@pytest.mark.parametrize("classes", [3, 10])
def test_equals_jsam_on_two_layer_linear_network(classes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5, bias=False), nn.Linear(5, classes, bias=False)).double()
    x = torch.randn(12, 7, dtype=torch.float64)
    y = torch.randint(0, classes, (12,))
    for rho in (0.05, 0.5):
        j, a = _pair(model, x, y, rho)
        for gj, ga in zip(j, a):
            torch.testing.assert_close(ga, gj, rtol=1e-10, atol=1e-12)


def test_equals_top_two_layer_jsam_on_relu_mlp_with_biases():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4)).double()
    model[0].requires_grad_(False)  # J-SAM then perturbs exactly the two layers adareg models
    x = torch.randn(10, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (10,))
    j, a = _pair(model, x, y, 1e-3)  # small ρ: no ReLU mask flips
    for gj, ga in zip(j, a):
        torch.testing.assert_close(ga, gj, rtol=1e-9, atol=1e-12)
    sgd = _update(copy.deepcopy(model), lambda m: sd.SGDStep(
        m, torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)), x, y)
    assert any(not torch.allclose(ga, gs) for ga, gs in zip(a, sgd))  # it does something


def test_head_only_when_layer_below_is_not_linear():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Unflatten(1, (1, 12)), nn.Conv1d(1, 3, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(30, 4)).double()
    x = torch.randn(6, 12, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    opt = AdaptiveRegularizedSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), rho=0.1)
    assert opt.below is None
    twin = copy.deepcopy(model)
    opt.step(x, y)
    assert opt.below is False
    # hand-written head-only penalty
    a = twin[3](twin[2](twin[1](twin[0](x))))
    z = twin[4](a)
    delta = (torch.softmax(z, 1) - nn.functional.one_hot(y, 4)).detach()
    d2, a2 = delta.pow(2).sum(1), a.pow(2).sum(1)
    lam = 0.1 / (d2 * (a2.detach() + 1)).sqrt()
    obj = nn.functional.cross_entropy(z, y) + 0.5 * (lam * d2 * a2).mean()
    obj.backward()
    torch.optim.SGD(twin.parameters(), lr=1.0).step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_rho_zero_is_sgd_and_registered_by_name():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    ada = _update(copy.deepcopy(model), lambda m: make_optimizer("adareg", m, lr=1.0,
                                                                 momentum=0.0, rho=0.0), x, y)
    sgd = _update(copy.deepcopy(model), lambda m: make_optimizer("sgd", m, lr=1.0,
                                                                 momentum=0.0), x, y)
    for p, q in zip(ada, sgd):
        torch.testing.assert_close(p, q)
    assert "adareg" in sd.optim.OPTIMIZERS
    with pytest.raises(ValueError, match="rho"):
        AdaptiveRegularizedSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), rho=-1.0)


@pytest.mark.parametrize("relu", [True, False])
def test_fast_step_equals_differentiable_objective(relu):
    torch.manual_seed(4)
    layers = [nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12)] + ([nn.ReLU()] if relu else [])
    model = nn.Sequential(*layers, nn.Linear(12, 5)).double()
    x, y = torch.randn(11, 6, dtype=torch.float64), torch.randint(0, 5, (11,))
    fast, ref = copy.deepcopy(model), copy.deepcopy(model)
    opt = AdaptiveRegularizedSGD(fast, torch.optim.SGD(fast.parameters(), lr=0.3), rho=0.2)
    opt.step(x, y)
    assert opt._mode == ("relu" if relu else "identity")
    slow = AdaptiveRegularizedSGD(ref, torch.optim.SGD(ref.parameters(), lr=0.3), rho=0.2)
    slow.zero_grad()
    slow.objective(x, y)[0].backward()
    slow.base_optimizer.step()
    for p, q in zip(fast.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)

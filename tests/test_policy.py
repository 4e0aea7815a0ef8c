"""Measuring never changes the model; bad input gets a clear error naming the fix."""

import copy

import pytest
import torch
from problems import PROBLEMS, make
from torch import nn

import sam_diagnostics as sd

BY_NAME = {p.name: p for p in PROBLEMS}


def snapshot(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone()
                  for n, p in model.named_parameters()},
        "rng": torch.get_rng_state(),
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                     for m in model.modules()),
    }


def assert_same(a, b):
    for key in ("params", "buffers", "grads"):
        assert a[key].keys() == b[key].keys()
        for n in a[key]:
            if a[key][n] is None:
                assert b[key][n] is None, (key, n)
            else:
                assert torch.equal(a[key][n], b[key][n]), (key, n)
    assert a["modes"] == b["modes"]
    assert a["requires_grad"] == b["requires_grad"]
    assert torch.equal(a["rng"], b["rng"])
    assert a["hooks"] == b["hooks"]


def bn_dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(8, 3)).double()


MEASUREMENTS = {
    "probe_m1": lambda mod, x, y: sd.Probe(mod).measure(x, y, rho=0.1, m=1),
    "probe_m2": lambda mod, x, y: sd.Probe(mod).measure(x, y, rho=0.1, m=2),
    "probe_exact": lambda mod, x, y: sd.Probe(mod, method="exact").measure(x, y, rho=0.1),
    "jacobian_fast": lambda mod, x, y: sd.jacobian_norms(mod, x, "fast"),
    "jacobian_exact": lambda mod, x, y: sd.jacobian_norms(mod, x, "exact"),
    "hutchinson": lambda mod, x, y: sd.jacobian_norms(mod, x, "hutchinson"),
    "grad_norms": lambda mod, x, y: sd.grad_norms(mod, x, y),
    "sam_epsilon": lambda mod, x, y: sd.sam_epsilon(mod, x, y, 0.1, 1),
}


@pytest.mark.parametrize("what", MEASUREMENTS)
@pytest.mark.parametrize("model_name", ["bn_dropout", "frozen", "sequence"])
def test_measuring_leaves_model_untouched(what, model_name):
    if model_name == "bn_dropout":
        model = bn_dropout_model().train()
        x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
        # sam_epsilon evaluates in the model's current mode; BatchNorm train mode would update
        # running stats, so it is measured in eval mode here
        if what == "sam_epsilon":
            model.eval()
    else:
        model, x, y = make(BY_NAME[model_name], batch=6)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.5)
    before = snapshot(model)
    MEASUREMENTS[what](model, x, y)
    assert_same(before, snapshot(model))


def test_train_mode_model_is_measured_with_running_statistics():
    model = bn_dropout_model()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    got = sd.Probe(model.train()).measure(x, y, rho=0.1)
    ref = sd.Probe(model.eval()).measure(x, y, rho=0.1)
    for name in ("loss", "jacobian_norm", "grad_norm", "activation_norm"):
        torch.testing.assert_close(torch.as_tensor(got[name].values),
                                   torch.as_tensor(ref[name].values))
    # and the train-mode result is deterministic (dropout off)
    again = sd.Probe(model.train()).measure(x, y, rho=0.1)
    assert (again["loss"] == got["loss"]).all()


def test_hooks_removed_when_forward_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("boom")
            return self.lin(x)

    model = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        sd.Probe(model).measure(torch.randn(2, 3), torch.tensor([0, 1]))
    assert all(not m._forward_hooks for m in model.modules())


def test_output_fn_for_dict_outputs():
    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 6)
            self.fc_out = nn.Linear(6, 3)

        def forward(self, x):
            return {"logits": self.fc_out(torch.tanh(self.body(x))), "aux": x}

    model = DictNet().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(TypeError, match="output_fn"):
        sd.jacobian_norms(model, x)
    pick = lambda out: out["logits"]  # noqa: E731
    ds = sd.Probe(model, output_fn=pick).measure(x, y, rho=0.1)
    assert ds.attrs["head"] == "fc_out"
    torch.testing.assert_close(torch.as_tensor(ds["jacobian_norm"].sel(view="sgd").values),
                               sd.jacobian_norms(model, x, "exact", output_fn=pick))


def nan_model():
    class NaNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x) * float("nan")

    return NaNNet()


def no_head_model():
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 2, 3)

        def forward(self, x):
            return self.conv(x[:, None]).mean(-1)

    return Conv()


net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
X, Y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])

BAD = [
    ("targets shape", lambda: sd.Probe(net).measure(X, Y[:3]), ValueError, r"targets.*\[4\]"),
    ("targets range", lambda: sd.Probe(net).measure(X, torch.tensor([0, 1, 2, 0])),
     ValueError, r"\[0, 2\)"),
    ("float targets", lambda: sd.Probe(net).measure(X, Y.float()), TypeError, "integer"),
    ("empty batch", lambda: sd.Probe(net).measure(X[:0], Y[:0]), ValueError, "empty"),
    ("negative rho", lambda: sd.Probe(net).measure(X, Y, rho=-1.0), ValueError, "rho"),
    ("m < 1", lambda: sd.Probe(net).measure(X, Y, m=0), ValueError, "m must"),
    ("unknown layer", lambda: sd.Probe(net, layers=["nope"]), ValueError, "unknown layer"),
    ("unknown head", lambda: sd.Probe(net, head="fc9"), ValueError, "unknown layer"),
    ("nan logits", lambda: sd.Probe(nan_model()).measure(X, Y), ValueError, "NaN"),
    ("nan inputs", lambda: sd.jacobian_norms(net, X * float("nan")), ValueError, "NaN"),
    ("no head", lambda: sd.Probe(no_head_model()).measure(X, Y), ValueError, "no linear head"),
    ("bad method", lambda: sd.jacobian_norms(net, X, method="magic"), ValueError, "method"),
    ("binary targets", lambda: sd.logit_scale(torch.randn(4), torch.tensor([0, 1, 2, 1])),
     ValueError, "{0, 1}"),
    ("3-d logits", lambda: sd.logit_scale(torch.randn(4, 2, 2), Y), ValueError, "output_fn"),
    ("logit/target rows", lambda: sd.logit_scale(torch.randn(4, 2), Y[:2]), ValueError, "[B]"),
    ("inputs type", lambda: sd.jacobian_norms(net, [[1.0, 2.0, 3.0]]), TypeError, "Tensor"),
    ("dict inputs", lambda: sd.grad_norms(net, {"input_ids": X}, Y), TypeError,
     r"model\(\*\*batch\).*TextClassifier"),
    ("loss not per-example", lambda: sd.grad_norms(
        net, X, Y, loss_fn=torch.nn.functional.cross_entropy), ValueError, "per-example"),
    ("eps unknown name", lambda: sd.perturbed(net, {"9.weight": torch.zeros(1)}).__enter__(),
     ValueError, "does not have"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_clear_error(case):
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call()


def test_perturbed_restores_bit_exactly_on_exception():
    model, x, y = make(BY_NAME["mlp"])
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    eps = {n: e[0] for n, e in sd.sam_epsilon(model, x, y, 0.37, 1).items()}
    with pytest.raises(RuntimeError, match="inside"):
        with sd.perturbed(model, eps):
            assert not torch.equal(model[0].weight, w["0.weight"])
            raise RuntimeError("inside")
    for n, p in model.named_parameters():
        assert torch.equal(p, w[n])


def test_fast_rejects_functional_use_of_a_parameter():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):  # emb.weight used outside emb's forward
            return self.head(torch.nn.functional.linear(x, self.emb.weight))

    model = Functional().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="fast' cannot be exact.*self-check"):
        sd.jacobian_norms(model, x, "fast")
    torch.testing.assert_close(sd.jacobian_norms(model, x, "auto"),
                               sd.jacobian_norms(model, x, "exact"))


class PositionalNet(nn.Module):
    """A positional embedding on ``torch.arange(L)``: a module input without a batch dimension."""

    def __init__(self, L=4, d=3):
        super().__init__()
        self.pos = nn.Embedding(L, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):  # x [B, L, d]
        L = x.shape[1]
        h = torch.tanh(x + self.pos(torch.arange(L)) + self.mix(torch.ones(L, 3, dtype=x.dtype)))
        return self.head(h.mean(1))


@pytest.mark.parametrize("B", [3, 4])  # B = 4 = L: the batch size coincides with the length
def test_unbatched_module_inputs_fall_back_to_exact(B):
    """Regression (found by the independent review): with L == B the per-layer rules took the
    sequence axis for the batch and were silently wrong; with L != B they crashed."""
    torch.manual_seed(0)
    model = PositionalNet().double()
    x, y = torch.randn(B, 4, 3, dtype=torch.float64), torch.randint(0, 2, (B,))
    exact = sd.jacobian_norms(model, x, "exact")
    torch.testing.assert_close(sd.jacobian_norms(model, x), exact)
    with pytest.raises(ValueError, match="no batch dimension"):
        sd.jacobian_norms(model, x, "fast")
    ds = sd.Probe(model).measure(x, y, rho=0.1)
    ref = sd.Probe(model, method="exact").measure(x, y, rho=0.1)
    for name in ("jacobian_norm", "grad_norm", "loss"):
        torch.testing.assert_close(torch.as_tensor(ds[name].values),
                                   torch.as_tensor(ref[name].values))
    auto = sd.SAM(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.1, 1).gradient(x, y)[0]
    func = sd.SAM(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.1, 1,
                  method="exact").gradient(x, y)[0]
    for n in auto:
        torch.testing.assert_close(auto[n], func[n])


def test_probe_watching_a_layer_without_a_rule():
    """Regression: watching a module handled by the torch.func fallback crashed with m = 1
    (its input hook fired inside vmap)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double().eval()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    ds = sd.Probe(net, layers=["1", "2"]).measure(x, y, rho=0.1, m=1)
    ref = sd.Probe(net, layers=["1", "2"], method="exact").measure(x, y, rho=0.1, m=1)
    torch.testing.assert_close(torch.as_tensor(ds["activation_norm"].values),
                               torch.as_tensor(ref["activation_norm"].values))


def _state(model, opt=None):
    return ([p.detach().clone() for p in model.parameters()],
            None if opt is None else copy.deepcopy(opt.state_dict()))


MISUSE = [
    ("dtype mismatch", lambda net, opt: sd.jacobian_norms(net, X.double()), TypeError,
     "float64 but the model's parameters are torch.float32"),
    ("dtype mismatch in SAM", lambda net, opt: opt.step(X.double(), Y), TypeError, "float64"),
    ("inference mode", lambda net, opt: _in_inference(lambda: sd.Probe(net).measure(X, Y)),
     ValueError, "inference_mode"),
    ("rho inf", lambda net, opt: sd.SAM(net, opt.base_optimizer, rho=float("inf")), ValueError,
     "finite"),
    ("probe of a non-module", lambda net, opt: sd.Probe(object()), TypeError, "nn.Module"),
    ("two-call with m=1", lambda net, opt: _two_call(net, sd.SAM(net, opt.base_optimizer, m=1)),
     ValueError, "two-call API"),
    ("first_step twice", lambda net, opt: _first_twice(net, opt), RuntimeError, "twice"),
]


def _in_inference(fn):
    with torch.inference_mode():
        return fn()


def _two_call(net, opt):
    torch.nn.functional.cross_entropy(net(X), Y).backward()
    opt.first_step()


def _first_twice(net, opt):
    two = sd.SAM(net, opt.base_optimizer, rho=0.1, m=None)
    torch.nn.functional.cross_entropy(net(X), Y).backward()
    two.first_step()
    try:
        two.first_step()
    finally:
        two.second_step()  # w restored exactly


@pytest.mark.parametrize("case", MISUSE, ids=[c[0] for c in MISUSE])
def test_misuse_gets_a_library_error_and_changes_nothing(case):
    _, call, exc, match = case
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = sd.SAM(net, torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9), 0.1, 1)
    before = _state(net, opt.base_optimizer)
    with pytest.raises(exc, match=match):
        call(net, opt)
    after = _state(net, opt.base_optimizer)
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    if case[0] != "first_step twice":  # that case finishes with second_step (lr = 0)
        assert before[1] == after[1]


def test_int32_targets_are_accepted():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    a = sd.grad_norms(net, X, Y)
    torch.testing.assert_close(sd.grad_norms(net, X, Y.int()), a)
    sd.SAM(net, torch.optim.SGD(net.parameters(), lr=0.1), 0.1, 1).step(X, Y.int())


def test_hutchinson_draws_fresh_probes_unless_given_a_generator():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    rng = torch.get_rng_state()
    a = sd.jacobian_norms(net, X, "hutchinson")
    b = sd.jacobian_norms(net, X, "hutchinson")
    assert not torch.equal(a, b)  # averaging calls gains information
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(sd.jacobian_norms(net, X, "hutchinson", generator=g1),
                               sd.jacobian_norms(net, X, "hutchinson", generator=g2))

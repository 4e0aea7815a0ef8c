"""Smoke tests of analyses/linear_logistic.py and analyses/deep_linear.py at --quick size.

They check that every output exists and has the right structure, and that the two exact
identities the analyses rest on hold: the 1-SAM up-weighting of a linear model measured by the
library equals σ(ρ‖x‖ − m)/σ(−m) (SPEC 2.4), and J-SAM on a two-layer linear network equals
SGD on the explicit penalty of SPEC 2.5.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sam_diagnostics as sd  # noqa: E402
from analyses import deep_linear, linear_logistic  # noqa: E402
from sam_diagnostics.data import load_dataset  # noqa: E402
from sam_diagnostics.models import build_model  # noqa: E402


def _nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


# ----------------------------------------------------------------------------- linear logistic


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("linear")
    summary = linear_logistic.main(["--out", str(out), "--quick", "--no-progress"])
    return out, summary


def test_linear_outputs_exist(linear_run):
    out, summary = linear_run
    for name in ("linear_upweighting", "linear_grad_ratio", "linear_accuracy"):
        for ext in ("png", "pdf"):
            assert _nonempty(out / f"{name}.{ext}"), f"{name}.{ext} missing or empty"
    for name in ("linear_logistic_summary.json", "linear_logistic_curves.csv",
                 "linear_logistic_examples.csv"):
        assert _nonempty(out / name)
    assert json.loads((out / "linear_logistic_summary.json").read_text()) == json.loads(
        json.dumps(summary))
    assert sorted(map(Path, summary["figures"])) == sorted(
        out / f"{n}.{e}" for n in ("linear_upweighting", "linear_grad_ratio", "linear_accuracy")
        for e in ("png", "pdf"))


def test_linear_structure(linear_run):
    out, summary = linear_run
    rhos = linear_logistic.QUICK_RHOS
    steps = linear_logistic.QUICK_STEPS
    assert summary["config"]["rhos"] == list(rhos)
    assert set(summary["per_rho"]) == {f"{r:g}" for r in rhos}
    curves = pd.read_csv(out / "linear_logistic_curves.csv")
    for col in ("rho", "seed", "step", "grad_ratio_update", "grad_ratio_at_w", "test_accuracy",
                "clean_train_accuracy", "noisy_train_accuracy", "ratio_max_rel_error"):
        assert col in curves
    recorded = linear_logistic.record_steps(steps)
    assert sorted(curves["step"].unique()) == recorded
    assert len(curves) == len(rhos) * len(recorded)  # one seed in --quick
    assert curves[["test_accuracy", "clean_train_accuracy", "noisy_train_accuracy"]].apply(
        lambda c: c.between(0, 1)).all().all()
    examples = pd.read_csv(out / "linear_logistic_examples.csv")
    assert set(examples["subset"]) == {"clean", "noisy"}
    assert len(examples) == len(rhos) * 1000  # every training example of every run
    assert (examples.groupby("rho")["step"].nunique() == 1).all()


def test_linear_ratio_matches_closed_form(linear_run):
    out, summary = linear_run
    assert summary["ratio_max_rel_error"] < 1e-6
    examples = pd.read_csv(out / "linear_logistic_examples.csv")
    # written values are self-consistent with the closed form too
    closed = linear_logistic.closed_form_ratio(examples["rho"].to_numpy(),
                                               examples["x_norm"].to_numpy(),
                                               examples["margin"].to_numpy())
    np.testing.assert_allclose(examples["measured_ratio"], closed, rtol=1e-6)
    # at rho = 0 both views coincide
    assert np.all(examples.query("rho == 0")["measured_ratio"] == 1.0)


def test_linear_finding_direction(linear_run):
    """The update gradients' clean/noisy ratio is larger for larger ρ (the paper's claim)."""
    _, summary = linear_run
    assert summary["update_grad_ratio_increases_with_rho_at_every_step"] is True
    for key, v in summary["per_rho"].items():
        if key != "0":  # 1-SAM up-weights clean examples more than noisy ones
            assert v["mean_upweight_clean_at_snapshot"] > v["mean_upweight_noisy_at_snapshot"]


def test_closed_form_properties():
    """SPEC 2.4: r lies in (1, e^{ρ‖x‖}) and increases with the margin."""
    m = np.linspace(-8, 8, 101)
    r = linear_logistic.closed_form_ratio(0.5, 3.0, m)
    assert np.all(r > 1) and np.all(r < np.exp(1.5))
    assert np.all(np.diff(r) > 0)
    assert np.allclose(linear_logistic.sigmoid(np.array([-800.0, 0.0, 800.0])), [0, 0.5, 1])


def test_linear_model_matches_closed_form_at_random_weights():
    """The measurement the script relies on, at weights the script never visits."""
    torch.manual_seed(0)
    model = linear_logistic.make_model()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.7)
    x = torch.randn(64, 20, dtype=torch.float64) * 1.5
    y = torch.randint(0, 2, (64,))
    ds = sd.Probe(model).measure(x, y, rho=0.3, m=1)
    measured = (ds["logit_scale"].sel(view="sam") / ds["logit_scale"].sel(view="sgd")).values
    closed = linear_logistic.closed_form_ratio(0.3, x.norm(dim=1).numpy(),
                                               ds["margin"].sel(view="sgd").values)
    np.testing.assert_allclose(measured, closed, rtol=1e-10)


def test_linear_help(capsys):
    with pytest.raises(SystemExit) as exc:
        linear_logistic.parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--out" in text and "--quick" in text and "--seed" in text


# ----------------------------------------------------------------------------- deep linear


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deep")
    summary = deep_linear.main(["--out", str(out), "--quick", "--no-progress"])
    return out, summary


def test_deep_outputs_exist(deep_run):
    out, summary = deep_run
    for name in ("deep_linear_norms", "deep_linear_equivalence"):
        for ext in ("png", "pdf"):
            assert _nonempty(out / f"{name}.{ext}"), f"{name}.{ext} missing or empty"
    for name in ("deep_linear_summary.json", "deep_linear_curves.csv",
                 "deep_linear_grad_check.csv"):
        assert _nonempty(out / name)
    assert set(summary["problems"]) == set(deep_linear.PROBLEMS)


def test_deep_structure(deep_run):
    out, summary = deep_run
    epochs = deep_linear.QUICK_EPOCHS
    curves = pd.read_csv(out / "deep_linear_curves.csv")
    for col in ("problem", "method", "epoch", "activation_norm", "last_layer_weight_norm",
                "test_accuracy"):
        assert col in curves
    assert set(curves["method"]) == set(deep_linear.METHODS)
    counts = curves.groupby(["problem", "method"]).size()
    assert (counts == epochs + 1).all()
    assert (curves["activation_norm"] > 0).all() and (curves["last_layer_weight_norm"] > 0).all()
    grads = pd.read_csv(out / "deep_linear_grad_check.csv")
    for name, cfg in deep_linear.PROBLEMS.items():
        s = summary["problems"][name]
        n_train = len(load_dataset(name, noise=deep_linear.NOISE, seed=0).train)
        checked = s["jsam_vs_explicit_grad_steps_checked"]
        assert checked == len(grads[grads["problem"] == name])
        assert checked == epochs * -(-n_train // cfg["batch"])
        assert set(s["final"]) == set(deep_linear.METHODS)


def test_deep_equivalence_asserted(deep_run):
    _, summary = deep_run
    for name, s in summary["problems"].items():
        assert s["jsam_vs_explicit_grad_max_rel_diff"] < 1e-6, name
        assert s["jsam_vs_explicit_max_param_rel_diff"] < 1e-6, name
        assert s["jsam_vs_explicit_final_param_rel_diff"] < 1e-6, name
        # not vacuous: the penalty moves the gradient by a visible amount
        assert s["penalty_grad_over_loss_grad_median"] > 1e-3, name
        # J-SAM and SGD on the explicit objective end at the same place
        jsam, explicit = s["final"]["jsam"], s["final"]["explicit"]
        assert jsam["last_layer_weight_norm"] == pytest.approx(
            explicit["last_layer_weight_norm"], rel=1e-9)


@pytest.mark.parametrize("binary", [True, False])
def test_explicit_objective_is_jsam(binary):
    """SPEC 2.5 at random weights and data, independently of the script's training loop."""
    torch.manual_seed(1)
    classes = 2 if binary else 5
    model = build_model("two_layer_linear", (7,), classes, width=6, binary_head=binary,
                        seed=3).double()
    x = torch.randn(11, 7, dtype=torch.float64)
    y = torch.randint(0, classes, (11,))
    opt = sd.SAM(model, torch.optim.SGD(model.parameters(), lr=0.1), rho=0.3, m=1,
                 variant="jsam")
    g_jsam, _ = opt.gradient(x, y)
    params = dict(model.named_parameters())
    g_reg = torch.autograd.grad(deep_linear.explicit_objective(model, x, y, 0.3),
                                list(params.values()))
    for (n, _), g in zip(params.items(), g_reg):
        torch.testing.assert_close(g_jsam[n], g, rtol=1e-10, atol=1e-14)
    # and it is not plain SGD
    sgd_opt = sd.SAM(model, torch.optim.SGD(model.parameters(), lr=0.1), rho=0.0, m=1,
                     variant="jsam")
    g_sgd, _ = sgd_opt.gradient(x, y)
    assert max((g_sgd[n] - g_jsam[n]).norm() / g_jsam[n].norm() for n in params) > 1e-3


def test_deep_help(capsys):
    with pytest.raises(SystemExit) as exc:
        deep_linear.parse_args(["--help"])
    assert exc.value.code == 0
    assert "--out" in capsys.readouterr().out

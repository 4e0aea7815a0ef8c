"""Smoke tests of the benchmark command (tiny sizes, seconds). No test asserts a time."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# ours is ``sd_benchmarks``: opacus installs a top-level ``benchmarks`` package into
# site-packages, which shadowed the old name unless run from the repository root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sam_diagnostics as sd  # noqa: E402
from sam_diagnostics.plan import make_plan  # noqa: E402
from sd_benchmarks import run  # noqa: E402
from sd_benchmarks.bench_norms import naive_grad_norms, naive_jacobian_norms  # noqa: E402
from sd_benchmarks.models import CONFIGS  # noqa: E402
from sd_benchmarks.timing import child_peak_rss, interleaved  # noqa: E402


def test_quick_run_writes_every_section(tmp_path, capsys):
    out = tmp_path / "bench.md"
    results = run.main(["--quick", "--reps", "1", "--out", str(out)])
    text = out.read_text()
    assert text in capsys.readouterr().out
    for title, _ in run.SECTIONS.values():
        assert title in text
    assert f"torch {torch.__version__}" in text and "1 thread(s)" in text
    assert "### Targets" in text
    groups = {(g["section"], g["model"]) for g in results}
    assert groups == {(s, m) for s in run.SECTIONS for m in CONFIGS
                      if m in run.SECTION_MODELS.get(s, CONFIGS)}
    for g in results:
        for r in g["rows"]:
            optional = r["method"].startswith(("BackPACK", "Opacus"))
            if not optional:  # the library's own methods and the references always run
                assert r["error"] is None, (g["model"], r["method"], r["error"])
            if r["error"] is None:
                assert r["ms"] > 0 and r["ratio"] > 0
        assert sum(r["baseline"] for r in g["rows"]) == 1


def test_only_selects_and_rejects_unknown():
    results = run.main(["--quick", "--reps", "1", "--only", "mlp", "grad"])
    assert [(g["section"], g["model"]) for g in results] == [("grad", "mlp")]
    with pytest.raises(SystemExit):
        run.parse(["--only", "resnet"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_models_use_only_per_layer_rules(name):
    """The benchmark measures the fast path, not the torch.func fallback."""
    model = CONFIGS[name].model()
    plan = make_plan(model)
    assert not plan.whole, plan.reason
    assert all(not e.rule.subtree for e in plan.entries.values())
    x, y = CONFIGS[name].data(3)
    assert model(x).shape == (3, 10)
    fast = sd.jacobian_norms(model, x, method="fast")
    torch.testing.assert_close(fast, sd.jacobian_norms(model, x, method="exact"), rtol=1e-4,
                               atol=1e-6)


def test_naive_references_match_the_library():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                              torch.nn.Linear(7, 3)).double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    torch.testing.assert_close(naive_jacobian_norms(net, x),
                               sd.jacobian_norms(net, x, method="exact"))
    torch.testing.assert_close(naive_grad_norms(net, x, y),
                               sd.grad_norms(net, x, y, method="exact"))


def test_interleaved_runs_every_method_reps_times():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                        reps=3, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert calls[:4] == ["a", "b", "b", "a"]  # rotated order


def test_check_targets():
    rows = [
        {"method": "base", "ms": 1.0, "ratio": 1.0, "targets": []},
        {"method": "fast", "ms": 2.0, "ratio": 2.0,
         "targets": [("ratio", 2.5), ("faster", "slow"), ("speedup", "slow", 100.0)]},
        {"method": "slow", "ms": 50.0, "ratio": 50.0, "targets": [("faster", "missing")]},
    ]
    run.check_targets(rows)
    assert rows[1]["met_each"] == [True, True, False]
    assert rows[2]["met_each"] == [None]
    assert rows[0]["met"] == ""


def test_memory_child_reports_a_number():
    delta, err = child_peak_rss("grad", "mlp", "fast", threads=1, quick=True, timeout=120)
    assert err == "" and delta is not None and delta >= 0


def test_recording_overhead_script_runs():
    from sd_benchmarks import recording_overhead

    out = recording_overhead.main(["--epochs", "1", "--reps", "1"])
    assert set(out) == {0, 10} and all(t > 0 for t in out.values())

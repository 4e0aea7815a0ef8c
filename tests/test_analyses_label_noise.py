"""The label-noise study's protocol code: selection rule, intervals, resumable stages, report."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analyses.study import driver, protocol, report, stats  # noqa: E402
from analyses.study.runs import Run, load_summary, run_all  # noqa: E402


def test_smooth_and_metrics_use_the_smoothed_validation_peak():
    val = [0.1, 0.1, 0.6, 0.1, 0.1, 0.1, 0.3, 0.35, 0.36, 0.35, 0.34, 0.1]  # lucky epoch 2
    summary = {"epoch": list(range(12)), "val_accuracy": val,
               "test_accuracy": [0.05 * k for k in range(12)]}
    m = stats.run_metrics(summary)
    assert m["sel_epoch"] == 8  # the plateau, not the single spike
    assert m["test_at_sel"] == pytest.approx(0.4)
    assert m["best_test"] == pytest.approx(0.55) and m["best_test_epoch"] == 11
    assert m["val_peak"] == pytest.approx(np.mean(val[6:11]))


def test_paired_interval_matches_a_hand_computation():
    a = {0: 0.50, 1: 0.52, 2: 0.49, 3: 0.55, 4: 0.51}
    b = {0: 0.47, 1: 0.50, 2: 0.47, 3: 0.50, 4: 0.49}
    d = np.array([a[k] - b[k] for k in a])
    mean, half, n = stats.paired(a, b)
    assert n == 5 and mean == pytest.approx(d.mean())
    assert half == pytest.approx(2.776 * d.std(ddof=1) / np.sqrt(5), rel=1e-3)
    assert stats.t975(40) == pytest.approx(2.021, abs=1e-3)  # not the normal 1.96


def test_select_carries_ties_to_the_middle_and_never_flips_a_coin():
    seeds = (100, 101, 102)
    base = {100: 0.0, 101: 0.01, 102: -0.01}
    scores = {0.01: {s: 0.30 + v for s, v in base.items()},
              0.03: {s: 0.38 + v for s, v in base.items()},
              0.05: {100: 0.385, 101: 0.38, 102: 0.38},   # best by a hair, within noise
              0.07: {100: 0.37, 101: 0.40, 102: 0.36},
              0.1: {s: 0.2 for s in seeds}}
    res = stats.select(scores, [0.01, 0.03, 0.05, 0.07, 0.1])
    assert res["best"] == 0.05
    assert res["tied"] == [0.03, 0.05, 0.07]
    assert res["choice"] == 0.05  # the middle of the tied range
    clear = stats.select({1: {s: 0.5 for s in seeds}, 2: {100: 0.2, 101: 0.21, 102: 0.19}},
                         [1, 2])
    assert clear["tied"] == [1] and clear["choice"] == 1


def test_select_on_a_product_grid_takes_the_tied_cell_nearest_the_median_position():
    """(γ_a, γ_V): the tied cells' per-axis median grid position decides, not the row-major
    order of the grid; equidistant cells go to the earlier one."""
    order = [(a, v) for a in (1e-3, 1e-2, 3e-2) for v in (1e-3, 1e-2, 3e-2)]
    s3 = (100, 101, 102)
    flat = {g: {s: 0.30 for s in s3} for g in order}
    for g in ((1e-3, 1e-3), (1e-2, 1e-2), (3e-2, 3e-2)):  # a tied diagonal
        flat[g] = {100: 0.40, 101: 0.41, 102: 0.39}
    flat[(3e-2, 3e-2)] = {100: 0.405, 101: 0.41, 102: 0.39}  # best by a hair
    res = stats.select(flat, order)
    assert res["best"] == (3e-2, 3e-2) and len(res["tied"]) == 3
    assert res["choice"] == (1e-2, 1e-2)  # the middle of the diagonal, not the first cell
    two = {g: {s: 0.30 for s in s3} for g in order}
    two[(1e-3, 3e-2)] = {100: 0.40, 101: 0.41, 102: 0.39}
    two[(1e-2, 1e-3)] = {100: 0.401, 101: 0.41, 102: 0.39}
    assert stats.select(two, order)["choice"] == (1e-3, 3e-2)  # equidistant: the earlier


def test_stages_resume_and_report(tmp_path, monkeypatch):
    """A miniature protocol end to end: every stage trains, a rerun trains nothing, the
    report is written with intervals and labels a missing stage as not run."""
    monkeypatch.setattr(driver, "TUNE_SEEDS", (100, 101))
    monkeypatch.setattr(driver, "FINAL_SEEDS", (0, 1))
    monkeypatch.setattr(driver, "ABLATION_SEEDS", (0,))
    monkeypatch.setattr(report, "TUNE_SEEDS", (100, 101))
    monkeypatch.setattr(report, "FINAL_SEEDS", (0, 1))
    s = dataclasses.replace(protocol.SETTINGS["mnist1d-mlp"], epochs=2, tune_epochs=2,
                            rho={"sam": (0.03, 0.05), "lsam": (0.1,), "jsam": (0.03,),
                                 "adareg": (0.1,)}, gammas=(1e-2,), gammas_v=None,
                            sizes=(1000, None),
                            widths=())
    study = driver.Study(tmp_path, s, log=lambda m: None)
    for stage in ("tune-sam", "main", "tune-ada", "ada", "tune-reg", "reg", "wd", "size"):
        study.stage(stage)
    adareg = Run("mnist1d", "mlp", "adareg", 0, 2, rho=0.1, group="final/mnist1d-mlp")
    assert load_summary(adareg.path(tmp_path)) is not None  # the new optimizer trains
    assert run_all(study.final_runs("main"), tmp_path) == 0.0  # resumed: nothing to train
    docs = tmp_path / "docs"
    out = report.full_report(tmp_path, docs, [s], ["--test"])
    text = out["path"].read_text()
    assert "**This report is partial**" in text and "var: not run" in text
    assert "Δ vs SGD (paired 95% CI)" in text and "adaptive reg." in text
    assert "± " in text and "[" in text
    assert str(tmp_path) not in text  # relative paths only
    # the summary across settings: one row per setting, paired intervals, "not run" where a
    # stage did not run (L-SAM/J-SAM ran in main; the width stage is not part of this setting)
    summary = text.split("## Summary across settings")[1].split("## What reproduces")[0]
    row = next(line for line in summary.splitlines() if line.startswith("| mnist1d-mlp |"))
    assert row.count("[") == 6 and "not run" not in row
    assert "width:" not in text.split("Stages:")[1].split("\n")[0]
    for png in (docs / "figures" / "study" / "mnist1d-mlp").glob("*.png"):
        assert png.stat().st_size > 1000
    assert {"accuracy.png", "comparison.png", "tuning.png", "upweighting.png",
            "ablation_size.png"} <= {p.name for p in
                                     (docs / "figures" / "study" / "mnist1d-mlp").iterdir()}
    choices = json.loads((tmp_path / "choices.json").read_text())
    assert choices["mnist1d-mlp"]["sam"]["choice"] in (0.03, 0.05)


def test_a_choice_at_a_grid_end_extends_the_grid(tmp_path, monkeypatch):
    """The grid rule: a chosen value at an end of its axis grows the axis one geometric step
    past it (trained on the tuning seeds), at most EXTENSIONS times per end; an interior
    choice stops it. Scores are synthetic functions of the grid value (no training)."""
    s = dataclasses.replace(protocol.SETTINGS["mnist1d-mlp"],
                            rho={"sam": (0.02, 0.05, 0.1), "jsam": (0.02, 0.05, 0.1)},
                            gammas=(1e-3, 1e-2), gammas_v=(1e-2, 3e-2))
    trained: list = []
    peak = {"sam": 0.03, "jsam": 10.0}  # sam peaks below its grid; jsam keeps rising

    def fake_scores(self, runs, key):
        out: dict = {}
        for r in runs:
            if r.optimizer == "sgd":
                out.setdefault("sgd", {})[r.seed] = 0.3
                continue
            v = key(r)  # a smooth optimum per axis: γ_a = 1e-4, γ_V = 0.03, ρ = peak
            dist = ((math.log(v[0] / 1e-4) ** 2 + math.log(v[1] / 0.03) ** 2)
                    if isinstance(v, tuple) else math.log(v / peak[r.optimizer]) ** 2)
            out.setdefault(v, {})[r.seed] = 0.5 - 0.01 * dist + 1e-4 * r.seed
        return out

    monkeypatch.setattr(driver.Study, "_scores", fake_scores)
    monkeypatch.setattr(driver.Study, "_go", lambda self, runs: trained.extend(runs) or runs)
    study = driver.Study(tmp_path, s, log=lambda m: None)
    sam = study.tune("sam")
    assert sam["grid"] == [0.008, 0.02, 0.05, 0.1] and sam["choice"] == 0.02  # one step
    assert sam["extended"] == {"ρ lower": 1} and sam["on_edge"] is False
    jsam = study.tune("jsam")  # two steps up, then the cap: the edge is reported, not hidden
    assert jsam["grid"] == [0.02, 0.05, 0.1, 0.2, 0.4] and jsam["choice"] == 0.4
    assert jsam["extended"] == {"ρ upper": 2} and "upper end" in jsam["on_edge"]
    reg = study.tune("regsgd")  # γ_a grows downward (twice); γ_V = 3e-2 is its optimum
    assert reg["extended"] == {"γ_a lower": 2, "γ_V upper": 1}
    assert {g[0] for g in reg["grid"]} == {1e-5, 1e-4, 1e-3, 1e-2}
    assert {g[1] for g in reg["grid"]} == {1e-2, 3e-2, 0.09}
    assert reg["choice"][1] == 3e-2
    assert all(r.seed in protocol.TUNE_SEEDS for r in trained)

"""Tests of sam_diagnostics.plots on small synthetic datasets in the stored schema (SPEC 3)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

from sam_diagnostics import plots
from sam_diagnostics.plots import (
    METHOD_ORDER,
    METHOD_PALETTE,
    MissingVariableError,
    method_label,
    plot_accuracy_curves,
    plot_logit_scale,
    plot_norms,
    plot_standard,
    plot_upweighting,
    run_table,
    save_figure,
    to_long,
)

# Effect sizes per method: (peak test accuracy, memorization speed, up-weighting strength)
_EFFECT = {
    "sgd": (0.52, 1.0, 0.0),
    "sam": (0.69, 0.35, 1.0),
    "lsam": (0.54, 0.9, 1.0),
    "jsam": (0.69, 0.4, 0.2),
    "regsgd": (0.61, 0.6, 0.0),
}


def make_run(
    optimizer: str = "sam",
    seed: int = 0,
    *,
    n_steps: int = 10,
    n_examples: int = 30,
    layers=("net.2", "net.4"),
    m: int = 1,
    rho: float = 0.05,
    noise_rate: float = 0.3,
) -> xr.Dataset:
    """One run in the stored schema, with roughly paper-like trends and seed noise."""
    rng = np.random.default_rng(1000 * seed + sum(optimizer.encode()))
    steps = np.arange(n_steps) * 100
    epoch = steps / 50.0
    t = np.linspace(0, 1, n_steps)
    is_noisy = np.zeros(n_examples, dtype=bool)
    is_noisy[rng.permutation(n_examples)[: int(round(noise_rate * n_examples))]] = True
    true_label = rng.integers(0, 10, n_examples)
    label = np.where(is_noisy, (true_label + 1 + rng.integers(0, 9, n_examples)) % 10, true_label)
    peak, memo, up = _EFFECT.get(optimizer, (0.5, 1.0, 0.5))

    # margins grow for clean examples first, noisy ones get memorized later
    growth = np.where(is_noisy[None, :], -2 + 5 * memo * t[:, None] ** 2, -1 + 6 * t[:, None])
    margin_sgd = growth + rng.normal(0, 0.7, (n_steps, n_examples))
    shift = 0.3 + 0.1 * rng.random(n_examples)
    margin = np.stack([margin_sgd, margin_sgd - shift], axis=1)  # (step, view, example)
    logit_scale = np.sqrt(2) / (1 + np.exp(margin))
    logit_scale[:, 1] = logit_scale[:, 0] * (
        1 + up * (np.exp(shift) - 1) / (1 + np.exp(-margin_sgd))
    )
    loss = np.log1p(np.exp(-margin))
    jac = 3 + 2 * t[:, None, None] + 0.3 * rng.random((n_steps, 2, n_examples))
    jac[:, 1] *= 1.05
    act = (
        2
        + t[:, None, None, None] * (1.5 - 0.5 * up)
        + 0.2 * rng.random((n_steps, 2, n_examples, len(layers))) * np.arange(1, len(layers) + 1)
    )
    test = peak - 0.12 * (t - 0.35) ** 2 * 4 * memo + rng.normal(0, 0.01, n_steps)
    test[::3] = np.nan  # not measured at every step
    ds = xr.Dataset(
        {
            "loss": (("step", "view", "example"), loss),
            "margin": (("step", "view", "example"), margin),
            "logit_scale": (("step", "view", "example"), logit_scale),
            "jacobian_norm": (("step", "view", "example"), jac),
            "grad_norm": (("step", "view", "example"), jac * logit_scale),
            "activation_norm": (("step", "view", "example", "layer"), act),
            "last_layer_weight_norm": (
                ("step",),
                1 + (1.5 - up) * t + rng.normal(0, 0.02, n_steps),
            ),
            "weight_norm": (("step", "module"), np.outer(1 + t, [1.0, 2.0])),
            "train_loss": (("step",), 2.3 * np.exp(-2 * t)),
            "test_accuracy": (("step",), np.clip(test, 0, 1)),
            "clean_train_accuracy": (("step",), np.clip(0.1 + 0.85 * t**0.5, 0, 1)),
            "noisy_train_accuracy": (("step",), np.clip(0.1 + 0.9 * memo * t**2, 0, 1)),
        },
        coords={
            "step": steps,
            "epoch": ("step", epoch),
            "example": np.arange(n_examples) * 7,
            "is_noisy": ("example", is_noisy),
            "label": ("example", label),
            "true_label": ("example", true_label),
            "view": ["sgd", "sam"],
            "layer": list(layers),
            "module": ["net.0", "net.4"],
        },
        attrs={
            "optimizer": optimizer,
            "rho": rho,
            "m": m,
            "seed": seed,
            "noise_rate": noise_rate,
            "dataset": "mnist1d",
            "model": "mlp",
            "lr": 0.01,
        },
    )
    return ds


def merge_runs(runs: list[xr.Dataset]) -> xr.Dataset:
    """Concatenate runs along ``run`` with the configuration promoted to ``run`` coords."""
    keys = ("optimizer", "rho", "seed", "dataset", "model", "noise_rate", "m")
    merged = xr.concat(runs, dim="run", coords="different", compat="equals", join="outer")
    return merged.assign_coords({k: ("run", [r.attrs[k] for r in runs]) for k in keys})


@pytest.fixture(scope="module")
def merged() -> xr.Dataset:
    return merge_runs([make_run(o, s) for o in ("sgd", "sam", "jsam") for s in (0, 1)])


@pytest.fixture(scope="module")
def single() -> xr.Dataset:
    return make_run("sam", 0)


# --------------------------------------------------------------------------------------------
# labels, palette, run table
# --------------------------------------------------------------------------------------------


def test_method_labels_and_order():
    assert method_label("sam", 1) == "1-SAM"
    assert method_label("sam", 128) == "SAM"
    assert method_label("SAM", None) == "SAM"
    assert method_label("regsgd") == "reg. SGD"
    assert set(METHOD_ORDER) == set(METHOD_PALETTE)
    assert len(set(METHOD_PALETTE.values())) == len(METHOD_PALETTE)


def test_run_table_merged_order_and_labels(merged):
    table = run_table(merged)
    assert list(dict.fromkeys(table["method"])) == ["sgd", "sam", "jsam"]
    assert list(dict.fromkeys(table["method_label"])) == ["SGD", "1-SAM", "J-SAM"]
    assert (table.loc[table.method == "sam", "color"] == METHOD_PALETTE["sam"]).all()


def test_run_table_single_run_uses_attrs(single):
    table = run_table(single)
    assert table.shape[0] == 1
    assert table.loc[0, "method_label"] == "1-SAM"
    assert table.loc[0, "seed"] == 0


def test_run_table_sweep_gets_config_suffix_and_shades():
    ds = merge_runs([make_run("sgd", 0), make_run("sam", 0, rho=0.01), make_run("sam", 0, rho=0.1)])
    table = run_table(ds)
    assert list(table["method_label"]) == ["SGD", "1-SAM (ρ=0.01)", "1-SAM (ρ=0.1)"]
    sam_colors = table.loc[table.method == "sam", "color"]
    assert sam_colors.nunique() == 2 and METHOD_PALETTE["sgd"] == table.loc[0, "color"]


# --------------------------------------------------------------------------------------------
# to_long
# --------------------------------------------------------------------------------------------


def test_to_long_matches_hand_mean(merged):
    df = to_long(merged, ["logit_scale", "test_accuracy"])
    run, step = 3, 500
    sub = merged.isel(run=run)
    noisy = sub["is_noisy"].values.astype(bool)
    expected = sub["logit_scale"].sel(step=step, view="sam").values[noisy].mean()
    row = df.query("run == @run and step == @step and view == 'sam' and subset == 'noisy'")
    assert len(row) == 1
    assert row["value"].iloc[0] == pytest.approx(expected)
    assert bool(row["is_noisy"].iloc[0]) is True
    # per-step curves pass through unchanged, NaN (unmeasured) steps dropped
    acc = df[(df.variable == "test_accuracy") & (df.run == run)]
    values = sub["test_accuracy"].values
    assert len(acc) == np.isfinite(values).sum()
    assert acc["subset"].eq("all").all() and acc["is_noisy"].isna().all()
    # seeds stay separate rows: 6 runs x 10 steps x 2 views x 2 subsets
    assert (df.variable == "logit_scale").sum() == 6 * 10 * 2 * 2
    assert {"method", "method_label", "seed", "epoch"} <= set(df.columns)
    assert df.loc[df.step == 500, "epoch"].eq(10.0).all()


def test_to_long_layers_and_no_split(single):
    df = to_long(single, "activation_norm", by_noise=False)
    assert set(df["layer"]) == {"net.2", "net.4"}
    assert df["subset"].eq("all").all()
    expected = single["activation_norm"].sel(step=300, view="sgd", layer="net.4").mean()
    got = df.query("step == 300 and view == 'sgd' and layer == 'net.4'")["value"]
    assert got.iloc[0] == pytest.approx(float(expected))


def test_to_long_per_run_is_noisy_and_missing_variables():
    a, b = make_run("sgd", 0), make_run("sgd", 1)  # different noisy sets per seed
    ds = merge_runs([a, b])
    assert ds["is_noisy"].dims == ("run", "example")
    df = to_long(ds, ["margin", "not_there"])
    got = df.query("run == 1 and step == 0 and view == 'sgd' and subset == 'clean'")["value"]
    clean = ~b["is_noisy"].values
    assert got.iloc[0] == pytest.approx(b["margin"].values[0, 0, clean].mean())
    with pytest.raises(ValueError, match="none of"):
        to_long(ds, ["not_there"])


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------


def _legend_colors(fig: Figure) -> dict[str, str]:
    out = {}
    for legend in fig.legends:
        for handle, text in zip(legend.legend_handles, legend.get_texts()):
            if handle is not None and hasattr(handle, "get_color"):
                out[text.get_text()] = mcolors.to_hex(handle.get_color())
    return out


@pytest.mark.parametrize(
    "func", [plot_accuracy_curves, plot_logit_scale, plot_norms, plot_upweighting]
)
def test_figures_single_and_merged(func, single, merged):
    for ds in (single, merged):
        fig = func(ds)
        assert isinstance(fig, Figure)
        assert any(ax.has_data() for ax in fig.axes)


def test_palette_consistent_across_figures(merged):
    a = _legend_colors(plot_accuracy_curves(merged))
    b = _legend_colors(plot_norms(merged))
    for label, method in (("SGD", "sgd"), ("1-SAM", "sam"), ("J-SAM", "jsam")):
        assert a[label] == b[label] == METHOD_PALETTE[method]
    # the plotted lines themselves use the method's colour
    fig = plot_logit_scale(merged)
    line_colors = {mcolors.to_hex(line.get_color()) for line in fig.axes[0].get_lines()}
    assert {METHOD_PALETTE[m] for m in ("sgd", "sam", "jsam")} <= line_colors


def _axis(fig, title):
    return next(ax for ax in fig.axes if ax.get_title() == title)


def test_accuracy_peak_values_are_the_tables_not_the_mean_curves(merged):
    fig = plot_accuracy_curves(merged)
    test_ax = _axis(fig, "test set")
    texts = [t.get_text() for t in test_ax.texts]
    assert len(texts) == 3
    df = to_long(merged, "test_accuracy")
    per_run = df[df.method == "sgd"].groupby("run")["value"].max()
    assert f"SGD: best {100 * per_run.mean():.1f}" in texts
    curve_max = df[df.method == "sgd"].groupby("epoch")["value"].mean().max()
    assert not np.isclose(per_run.mean(), curve_max)  # the two differ on these data
    assert test_ax.get_ylabel() == "accuracy (%)"
    assert 0 <= test_ax.get_ylim()[0] and test_ax.get_ylim()[1] <= 100


def test_best_validation_epoch_is_marked(merged):
    rng = np.random.default_rng(0)
    val = merged["test_accuracy"] + 0.02 * rng.standard_normal(merged["test_accuracy"].shape)
    fig = plot_accuracy_curves(merged.assign(val_accuracy=val))
    assert len(fig.axes) == 4
    test_ax = _axis(fig, "test set")
    assert all("at best-val" in t.get_text() for t in test_ax.texts)
    # one dotted vertical line per method in every panel
    for ax in fig.axes:
        dotted = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
        assert len(dotted) == 3


def test_missing_variables_skip_or_raise(single):
    partial = single.drop_vars(["clean_train_accuracy", "jacobian_norm", "last_layer_weight_norm"])
    assert len(plot_accuracy_curves(partial).axes) == 2
    # activation only, no SAM-view ratio panel
    assert len([ax for ax in plot_norms(partial).axes if ax.get_visible()]) == 1
    sgd_only = single.sel(view=["sgd"])
    assert len(plot_logit_scale(sgd_only).axes) == 1
    with pytest.raises(MissingVariableError, match="both views"):
        plot_upweighting(sgd_only)
    empty = single[["train_loss"]]
    for func in (plot_accuracy_curves, plot_logit_scale, plot_norms, plot_upweighting):
        with pytest.raises(ValueError):
            func(empty)


def test_upweighting_step_choice(merged):
    fig = plot_upweighting(merged, step=420)  # nearest recorded step is 400
    assert "step 400" in fig.get_suptitle()
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 3
    assert "step 900" in plot_upweighting(merged).get_suptitle()


def test_save_figure_and_plot_standard(tmp_path, merged, single):
    paths = save_figure(plot_logit_scale(single), tmp_path, "ls")
    assert [p.name for p in paths] == ["ls.png", "ls.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    out = plot_standard(merged.drop_vars("margin"), tmp_path / "std")
    names = sorted(p.name for p in out)
    assert names == sorted(
        f"{n}.{e}" for n in ("accuracy", "logit_scale", "norms") for e in ("png", "pdf")
    )
    assert all(p.stat().st_size > 1000 for p in out)
    with pytest.raises(MissingVariableError):
        plot_standard(single[["train_loss"]], tmp_path / "none")


def test_does_not_import_torch_or_package_modules():
    import ast
    from pathlib import Path

    roots = set()
    files = sorted(Path(plots.__file__).parent.glob("*.py"))
    assert len(files) >= 5
    for file in files:
        assert len(file.read_text().splitlines()) < 600, f"{file.name} is too long"
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                # relative imports stay inside the plots package (level 1: a sibling module)
                assert node.level in (0, 1), "plots must not import other package modules"
                if node.level == 0:
                    roots.add(node.module.split(".")[0])
    allowed = {
        "__future__",
        "colorsys",
        "contextlib",
        "math",
        "warnings",
        "collections",
        "pathlib",
        "matplotlib",
        "numpy",
        "pandas",
        "seaborn",
        "xarray",
    }
    assert roots <= allowed, roots - allowed


def test_frames_are_small(merged):
    """seaborn gets example-averaged rows, never one row per example."""
    df = to_long(merged, ["logit_scale"])
    assert len(df) < merged.sizes["example"] * merged.sizes["step"] * merged.sizes["run"]
    assert isinstance(df, pd.DataFrame)


def test_figures_leave_pyplot_and_backend_alone(single, tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    before = (matplotlib.rcParams._get_backend_or_none(), plt.get_fignums())
    save_figure(plot_norms(single), tmp_path, "n", formats=("png",))
    assert (matplotlib.rcParams._get_backend_or_none(), plt.get_fignums()) == before


def test_accuracy_without_test_curve_has_no_peak(single):
    fig = plot_accuracy_curves(single.drop_vars("test_accuracy"))
    assert len(fig.axes) == 2 and not any(ax.texts for ax in fig.axes)


def test_logit_scale_has_an_early_window_and_a_log_full_range(merged):
    fig = plot_logit_scale(merged)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3
    assert visible[2].get_yscale() == "log" and visible[1].get_yscale() == "linear"
    assert visible[1].get_xlim()[1] < visible[2].get_xlim()[1]


def test_norm_panels_use_a_log_axis(merged):
    fig = plot_norms(merged)
    scales = [ax.get_yscale() for ax in fig.axes if ax.get_visible()]
    assert scales.count("log") == 3


def test_study_figures(tmp_path):
    from sam_diagnostics.plots.study import (
        plot_ablation,
        plot_comparison,
        plot_curves,
        plot_tuning,
    )

    rng = np.random.default_rng(0)
    tuning = pd.DataFrame([{"method": "1-SAM (ρ)", "key": "sam", "value": f"{v:g}",
                            "position": i, "mean": 0.4 + 0.01 * i, "se": 0.01,
                            "tied": i > 1, "chosen": i == 2, "sgd": 0.38}
                           for i, v in enumerate((0.01, 0.03, 0.05))])
    comp = pd.DataFrame([{"label": m.upper(), "method": m, "seed": k, "metric": "best test",
                          "value": 0.5 + 0.05 * (m == "sam") + 0.01 * rng.standard_normal()}
                         for m in ("sgd", "sam", "adareg") for k in range(5)])
    abl = pd.DataFrame([{"x": n, "method": m, "seed": k,
                         "value": 0.5 + 0.02 * (m == "sam") + 0.01 * rng.standard_normal()}
                        for n in (1000, 2000, 4000) for m in ("sgd", "sam") for k in range(3)])
    curves = pd.DataFrame([{"label": m, "seed": k, "epoch": e, "variable": "norm",
                            "value": (100.0 if m == "runaway" else 1.0) * (1 + e),
                            "subset": "all"}
                           for m in ("sgd", "runaway") for k in range(2) for e in range(10)])
    figs = [plot_tuning(tuning), plot_comparison(comp),
            plot_ablation(abl, xlabel="n", title="size"),
            plot_curves(curves, [("norm", "norm", "‖a‖")], marks={"sgd": 3.0},
                        colors={"sgd": "#000000", "runaway": "#e69f00"}, title="t",
                        robust=("norm",))]
    for i, fig in enumerate(figs):
        assert save_figure(fig, tmp_path, f"f{i}", formats=("png",))[0].stat().st_size > 1000

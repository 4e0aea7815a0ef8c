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


def test_accuracy_peak_marked(merged):
    fig = plot_accuracy_curves(merged)
    test_ax = fig.axes[2]
    texts = [t.get_text() for t in test_ax.texts]
    assert len(texts) == 3 and all("%" in t for t in texts)
    df = to_long(merged, "test_accuracy")
    best = df[df.method == "sgd"].groupby("epoch")["value"].mean().max() * 100
    assert any(t.startswith(f"{best:.1f}%") for t in texts)
    assert test_ax.get_ylabel() == "accuracy (%)"


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

    tree = ast.parse(Path(plots.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "plots must not import other package modules"
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

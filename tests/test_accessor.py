"""The ``ds.sd`` accessor: registered on import, and backed by the existing functions."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from matplotlib.figure import Figure
from tiny_runs import tiny_run, tiny_splits

import sam_diagnostics as sd
from sam_diagnostics.live import live_summary
from sam_diagnostics.plots import to_long
from sam_diagnostics.summary import summary_table


@pytest.fixture(scope="module")
def runs():
    splits = tiny_splits()
    return [tiny_run(splits, None, optimizer=o, epochs=3).dataset() for o in ("sgd", "sam")]


def test_registered_on_import(runs):
    assert hasattr(xr.Dataset, "sd")
    assert isinstance(runs[0].sd, sd.accessor.SDAccessor)


def test_summary_is_summary_table(runs):
    pd.testing.assert_frame_equal(runs[0].sd.summary(), summary_table(runs[0]))
    merged = sd.merge_runs(runs)
    table = merged.sd.summary()
    assert list(table["optimizer"]) == ["sgd", "sam"]
    assert "n_seeds" in merged.sd.group_summary()


def test_ratio_is_the_ratio_of_subset_means(runs):
    ds = runs[1]
    r = ds.sd.ratio("logit_scale")
    assert r.dims == ("subset", "step") and list(r["subset"].values) == ["clean", "noisy"]
    noisy = ds["is_noisy"].values
    ls = ds["logit_scale"].isel(step=-1)
    want = ls.sel(view="sam").values[noisy].mean() / ls.sel(view="sgd").values[noisy].mean()
    assert float(r.sel(subset="noisy").isel(step=-1)) == pytest.approx(want)
    # the same number the live scalars and the figures' tidy frame give
    live = live_summary(ds.isel(step=[-1]))
    assert float(r.sel(subset="clean").isel(step=-1)) == pytest.approx(
        live["logit_scale_ratio/clean"])
    long = to_long(ds, "logit_scale").query("subset == 'clean'")
    last = long[long["step"] == long["step"].max()].set_index("view")["value"]
    assert float(r.sel(subset="clean").isel(step=-1)) == pytest.approx(
        last["sam"] / last["sgd"])
    per = ds.sd.ratio("jacobian_norm", per_example=True)
    assert per.dims == ("step", "example")
    assert ds.sd.ratio("activation_norm", by_noise=False).dims == ("subset", "step", "layer")
    merged = sd.merge_runs(runs)
    assert set(merged.sd.ratio().dims) == {"subset", "run", "step"}
    with pytest.raises(ValueError, match="views"):
        ds.sd.ratio("last_layer_weight_norm")
    with pytest.raises(KeyError):
        ds.sd.ratio("nope")


def test_at_peak_and_selections(runs):
    ds = runs[0]
    best = int(ds["step"].values[int(np.nanargmax(ds["test_accuracy"].values))])
    assert ds.sd.peak_step() == best
    peak = ds.sd.at_peak()
    assert int(peak["step"]) == best and "step" not in peak.dims
    assert float(peak["test_accuracy"]) == pytest.approx(np.nanmax(ds["test_accuracy"].values))
    merged = sd.merge_runs(runs)
    at = merged.sd.at_peak()
    assert at.sizes["run"] == 2 and "step" not in at.dims
    for i, run in enumerate(runs):
        assert int(at["peak_step"].values[i]) == run.sd.peak_step()
    noisy = ds.sd.noisy()
    assert bool(noisy["is_noisy"].all()) and noisy.sizes["example"] == int(ds["is_noisy"].sum())
    assert not bool(ds.sd.clean()["is_noisy"].any())
    assert int(ds.sd.last()["step"]) == int(ds["step"].values[-1])
    assert ds.sd.live() == live_summary(ds.isel(step=[-1]))
    assert ds.sd.config()["optimizer"] == "sgd"


def test_plot_calls_the_figure_functions(runs, tmp_path):
    merged = sd.merge_runs(runs)
    for kind in ("accuracy", "logit_scale", "norms", "upweighting"):
        assert isinstance(merged.sd.plot(kind), Figure)
    paths = runs[0].sd.plot("logit_scale", out_dir=tmp_path)
    assert [p.name for p in paths] == ["logit_scale.png", "logit_scale.pdf"]
    paths = merged.sd.plot(out_dir=tmp_path / "all")
    assert {p.stem for p in paths} == {"accuracy", "logit_scale", "norms", "upweighting"}
    with pytest.raises(ValueError, match="out_dir"):
        merged.sd.plot()
    with pytest.raises(ValueError, match="kind"):
        merged.sd.plot("nope")

"""open_runs (issue 13): many stored runs as one lazily loaded Dataset over ``run``."""

import warnings

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("dask")

import sam_diagnostics as sd  # noqa: E402
from sam_diagnostics.cli import main  # noqa: E402
from sam_diagnostics.store import RunStore  # noqa: E402
from sam_diagnostics.summary import summary_table  # noqa: E402
from sd_benchmarks.many_runs import synthetic_run, write_runs  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    write_runs(d, 50, steps=3, examples=8)
    return d


def test_open_runs_is_lazy_and_equals_merge_runs(folder):
    import dask.array as da

    lazy = sd.open_runs(folder)
    assert lazy.sizes["run"] == 50
    for name, var in lazy.data_vars.items():
        assert isinstance(var.data, da.Array), name  # nothing read yet
    assert set(lazy["optimizer"].values) == {"sgd", "sam", "lsam", "jsam", "regsgd"}
    eager = sd.merge_runs(folder)
    loaded = lazy.compute()
    assert loaded.identical(eager)
    # a glob pattern picks runs, as a folder does
    some = sd.open_runs(str(folder / "run-000[0-4].zarr"))
    assert list(some["run"].values) == [f"run-000{i}" for i in range(5)]


def test_summary_of_open_runs_equals_the_eager_path(folder):
    got = summary_table(sd.open_runs(folder))
    for want in (summary_table(folder), summary_table(sd.merge_runs(folder))):
        pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True),
                                      check_dtype=False)


def test_open_runs_skips_a_run_without_steps_and_plot_takes_it(folder, tmp_path, capsys):
    pytest.importorskip("sam_diagnostics.plots")
    runs = tmp_path / "runs"
    write_runs(runs, 3, steps=3, examples=8)
    empty = RunStore(runs / "zzz.zarr")  # being started: no step yet
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = sd.open_runs(runs)
        assert ds.sizes["run"] == 3 and any("zzz" in str(w.message) for w in caught)
    finally:
        empty.discard()
    assert main(["plot", str(runs), "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "accuracy.png").exists()
    assert main(["summary", str(runs / "*.zarr")]) == 0
    assert capsys.readouterr().out.count("run-000") == 3


def test_synthetic_runs_follow_the_schema(folder):
    assert sd.validate_run(folder / "run-0000.zarr").ok
    assert np.isfinite(synthetic_run(0, steps=2, examples=4)["loss"].values).all()

"""Sweeps on dask.distributed (issue 13): a LocalCluster sweep equals the same sweep run one
after the other, and a sweep runs on a cluster someone else started (its scheduler address)."""

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dask.distributed")

from sam_diagnostics import open_run  # noqa: E402
from sam_diagnostics.cli import main  # noqa: E402
from sam_diagnostics.sweep import pending_runs, plan_sweep, run_sweep  # noqa: E402
from sam_diagnostics.train import ConfigError, TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = TrainConfig(dataset="digits", model="mlp", width=8, n_samples=120, batch_size=40,
                   probe_size=8, epochs=1, record_every=1, eval_batch_size=256)
TINY = ["--dataset", "digits", "--model", "mlp", "--width", "8", "--n-samples", "120",
        "--batch-size", "40", "--probe-size", "8", "--record-every", "1", "--epochs", "1",
        "--no-progress"]


@pytest.fixture(autouse=True)
def _env(monkeypatch):  # dask's worker processes import sam_diagnostics from this checkout
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def same_stores(a: Path, b: Path) -> None:
    for name in sorted(p.name for p in a.iterdir() if p.suffix == ".zarr"):
        x, y = open_run(a / name), open_run(b / name)
        assert set(x.data_vars) == set(y.data_vars), name
        for v in x.data_vars:  # bit for bit (NaN where both are NaN)
            np.testing.assert_array_equal(x[v].values, y[v].values, err_msg=f"{name}:{v}")
        assert x.attrs["complete"] == y.attrs["complete"] == 1


def test_local_cluster_sweep_equals_the_sequential_sweep(tmp_path):
    lines = {}
    for how, jobs in (("dask", 2), ("sequential", 1)):
        plan = plan_sweep(BASE, tmp_path / how, ["sgd", "sam"], [0, 1], [0.05])
        out: list[str] = []
        failed = run_sweep(pending_runs(plan, echo=out.append), jobs=jobs, threads=1,
                           echo=out.append)
        assert failed == [] and len(plan) == 4
        lines[how] = out
    assert any("local dask cluster of 2 worker processes" in line for line in lines["dask"])
    assert sum(line.startswith("[") for line in lines["dask"]) == 4  # progress: [i/4] per run
    same_stores(tmp_path / "dask", tmp_path / "sequential")


def test_sweep_on_a_cluster_someone_else_started(tmp_path, capsys):
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        out = tmp_path / "runs"
        args = ["sweep", *TINY, "--optimizers", "sgd", "--seeds", "0,2", "--out", str(out),
                "--scheduler", cluster.scheduler_address]
        assert main(args) == 0
        text = capsys.readouterr().out
        assert f"the dask scheduler at {cluster.scheduler_address}" in text
        assert "[2/2]" in text and open_run(out / "sgd-seed2.zarr").attrs["complete"] == 1
        assert main(args) == 0  # resumable: finished runs are skipped
        assert "2 runs, 2 already done, 0 to run" in capsys.readouterr().out
        # one run that fails is reported, the others finish, exit status 2
        args[args.index("0,2")] = "0-1"
        args[args.index("--out") + 1] = str(tmp_path / "more")
        (tmp_path / "more").mkdir()
        (tmp_path / "more" / "sgd-seed1.zarr").write_text("a file in the way")
        assert main([*args, "--overwrite"]) == 2
        captured = capsys.readouterr()
        assert "sgd-seed1.zarr: failed:" in captured.out
        assert "1 of 2 runs failed" in captured.err
        assert open_run(tmp_path / "more" / "sgd-seed0.zarr").attrs["complete"] == 1


def test_a_sweep_under_torchrun_is_refused(tmp_path, monkeypatch, capsys):
    """Under torchrun every rank would run the whole sweep: refused, naming the fix."""
    plan = plan_sweep(TrainConfig(dataset="digits", epochs=1), tmp_path, ["sgd"], [0], [0.05])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="torchrun"):
        run_sweep(pending_runs(plan, echo=lambda m: None), jobs=1)
    assert not any(tmp_path.iterdir())  # nothing trained
    assert main(["sweep", "--out", str(tmp_path), "--dataset", "digits", "--epochs", "1",
                 "--optimizers", "sgd", "--seeds", "0", "--no-progress"]) == 2
    assert "torchrun" in capsys.readouterr().err and not any(tmp_path.iterdir())

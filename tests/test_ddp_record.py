"""Recording under ``torchrun --nproc_per_node 2`` (gloo, CPU; issue 13): the store of a
2-process ``sam-diagnostics train`` holds what one process records for the same run, with the
global example ids and no rank dimension, written by rank 0 alone; a rank that dies leaves the
flushed steps readable."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from sam_diagnostics import open_run
from sam_diagnostics.train import TrainConfig, train

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"
ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--dataset", "digits", "--model", "mlp", "--width", "8", "--n-samples", "128",
          "--val-fraction", "0", "--batch-size", "32", "--probe-size", "20", "--epochs", "2",
          "--record-every", "1", "--no-progress", "--threads", "1", "--flush-every", "1"]
CONFIGS = {  # name: (extra flags, the same TrainConfig fields)
    "sam-m1": (["--optimizer", "sam", "--group-size", "1"], {"optimizer": "sam", "m": 1}),
    "sam-batch": (["--optimizer", "sam", "--group-size", "0", "--sync-epsilon", "global"],
                  {"optimizer": "sam", "m": 0}),
    "regsgd": (["--optimizer", "regsgd"], {"optimizer": "regsgd"}),
}
BASE = TrainConfig(dataset="digits", model="mlp", width=8, n_samples=128, val_fraction=0.0,
                   batch_size=32, probe_size=20, epochs=2, record_every=1)


def torchrun(runs, *extra, check=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(SCRIPT), json.dumps(runs), *extra]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One torchrun: the runs of CONFIGS, then one where rank 1 dies at step 6."""
    d = tmp_path_factory.mktemp("ddp_record")
    runs = [["train", *COMMON, *flags, "--out", str(d / f"{name}-two.zarr")]
            for name, (flags, _) in CONFIGS.items()]
    runs.append(["train", *COMMON, "--optimizer", "sam", "--epochs", "3", "--out",
                 str(d / "killed.zarr")])
    res = torchrun(runs, f"{len(runs) - 1}:6", check=False)
    assert res.returncode != 0  # the dead rank fails the job
    return d


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_record_what_one_process_records(stores, name):
    two = open_run(stores / f"{name}-two.zarr")
    one = train({**vars(BASE), **CONFIGS[name][1]}, stores / f"{name}-one.zarr",
                progress=False)
    assert two.attrs["world_size"] == 2 and "world_size" not in one.attrs
    assert "rank" not in two.dims and two.sizes == one.sizes
    np.testing.assert_array_equal(two["example"].values, one["example"].values)  # global ids
    for c in ("is_noisy", "label", "true_label", "step", "epoch"):
        np.testing.assert_array_equal(two[c].values, one[c].values)
    assert set(two.data_vars) == set(one.data_vars)
    for v in one.data_vars:  # step 0 (same model state) and the steps trained since
        np.testing.assert_allclose(two[v].values, one[v].values, rtol=1e-6, atol=1e-6,
                                   err_msg=v)
    assert two.attrs["complete"] == 1 and not Path(f"{stores}/{name}-two.zarr.lock").exists()


def test_a_rank_that_dies_leaves_the_flushed_steps_readable(stores):
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ds = open_run(stores / "killed.zarr")
    # step 0 and the first epoch's record (step 4) were flushed before rank 1 died at step 6
    assert list(ds["step"].values[:2]) == [0, 4] and ds.attrs["complete"] == 0
    assert np.isfinite(ds["loss"].values).all()

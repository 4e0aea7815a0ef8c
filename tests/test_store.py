"""Run stores that never lose a run: exclusive up-front creation, writer locks, refusing
non-runs, self-describing variables, schema validation (issue 11)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import sam_diagnostics as sd
from sam_diagnostics import schema
from sam_diagnostics.data import load_dataset
from sam_diagnostics.models import build_model
from sam_diagnostics.record import Recorder
from sam_diagnostics.runs import (
    EmptyRunError,
    IncompleteRunWarning,
    NotARunError,
    open_run,
    validate_run,
)
from sam_diagnostics.store import RunStore, StoreLockedError, lock_path, read_lock

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TINY = ["--dataset", "digits", "--model", "mlp", "--width", "16", "--n-samples", "160",
        "--batch-size", "64", "--probe-size", "16", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits", noise=0.3, seed=0, n_samples=120, val_fraction=0.0)


def _step(s: int) -> xr.Dataset:
    return xr.Dataset({"train_loss": ("step", [float(s)])}, coords={"step": [s]})


def _finished_run(splits, path, epochs=1):
    model = build_model("linear", splits.input_shape, splits.num_classes, seed=0)
    with Recorder(model, path, probe=8, train=splits.train, test=splits.test,
                  config={"optimizer": "sgd", "seed": 0}, steps_per_epoch=1) as rec:
        for _ in range(epochs):
            rec.step(1.0)
    return open_run(path)


def _wait_for(predicate, proc, seconds=90.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# creation up front, locks
# --------------------------------------------------------------------------------------------


def test_store_is_created_up_front_with_config_schema_version_and_writer(tmp_path):
    path = tmp_path / "run.zarr"
    store = RunStore(path, attrs={"optimizer": "sam", "rho": 0.05}, flush_every=100)
    raw = xr.open_zarr(path)  # plain xarray: the store explains itself before any step
    assert raw.attrs["schema_version"] == schema.SCHEMA_VERSION
    assert raw.attrs["optimizer"] == "sam" and raw.attrs["complete"] == 0
    assert raw.attrs["writer"] == f"{os.getpid()}@{os.uname().nodename}"
    assert read_lock(path)["pid"] == os.getpid()
    with pytest.raises(EmptyRunError, match=f"being written by pid {os.getpid()}"):
        open_run(path)
    store.append(_step(0))
    store.close(complete=True)
    assert not lock_path(path).exists() and read_lock(path) is None
    assert open_run(path).attrs["complete"] == 1


def test_second_writer_fails_naming_the_first(tmp_path):
    path = tmp_path / "run.zarr"
    first = RunStore(path)
    for overwrite in (False, True):
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()} on host"):
            RunStore(path, overwrite=overwrite)
    first.append(_step(0))
    first.close(complete=True)
    assert open_run(path).sizes["step"] == 1


def test_overwrite_restores_the_old_run_when_the_new_one_records_nothing(splits, tmp_path):
    path = tmp_path / "run.zarr"
    old = _finished_run(splits, path, epochs=2)

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(64, 10)

        def forward(self, x):
            raise RuntimeError("broken model")

    with pytest.raises(RuntimeError, match="broken model"):
        Recorder(Broken(), path, probe=8, train=splits.train, overwrite=True)
    xr.testing.assert_identical(open_run(path), old)
    assert [p.name for p in tmp_path.iterdir()] == ["run.zarr"]  # no lock, no leftovers
    store = RunStore(path, overwrite=True)
    store.discard()
    xr.testing.assert_identical(open_run(path), old)
    store = RunStore(path, overwrite=True)  # replaced once the new run holds a step
    store.append(_step(5))
    store.flush()
    assert list(open_run(path, warn=False)["step"].values) == [5]
    store.close(complete=True)
    assert [p.name for p in tmp_path.iterdir()] == ["run.zarr"]


def test_overwrite_refuses_what_is_not_a_run(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("keep")
    with pytest.raises(FileExistsError, match="not a run store"):
        RunStore(precious, overwrite=True)
    assert precious.read_text() == "keep" and not lock_path(precious).exists()


def test_unwritable_path_fails_at_creation(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        RunStore(tmp_path / "file" / "run.zarr")
    with pytest.raises(OSError):
        RunStore(tmp_path / "file" / "sub" / "run.zarr")


def _train_cmd(out, *extra):
    return [sys.executable, "-m", "sam_diagnostics", "train", *TINY, "--epochs", "100000",
            "--record-every", "0", "--record-every-steps", "2", "--flush-every", "1",
            "--out", str(out), *extra]


def test_two_writer_processes_and_overwrite_during_a_live_write(tmp_path):
    run = tmp_path / "run.zarr"
    first = subprocess.Popen(_train_cmd(run), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=ENV)
    try:
        _wait_for(lambda: read_lock(run) is not None and (run / ".zmetadata").exists(), first)
        for extra in ((), ("--overwrite",)):
            start = time.monotonic()
            second = subprocess.run(_train_cmd(run, *extra), capture_output=True, text=True,
                                    timeout=120, env=ENV)
            assert second.returncode == 2, second.stderr
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
            assert f"pid {first.pid} on host" in lines[0]
            assert time.monotonic() - start < 60
        _wait_for(lambda: open_run(run, load=False, warn=False).sizes.get("step", 0) >= 3
                  if (run / "step").exists() else False, first)
        assert first.poll() is None  # the first writer is unharmed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        first.stderr.close()
    with pytest.warns(IncompleteRunWarning, match="stopped before finishing"):
        killed = open_run(run)
    assert killed.sizes["step"] >= 3 and killed.attrs["complete"] == 0
    # the killed writer's lock is stale: a new writer may overwrite
    assert lock_path(run).exists() and read_lock(run) is None
    done = subprocess.run([sys.executable, "-m", "sam_diagnostics", "train", *TINY, "--epochs",
                           "1", "--out", str(run), "--overwrite"], capture_output=True,
                          text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr
    assert open_run(run).attrs["complete"] == 1


@pytest.mark.parametrize("out, match", [
    ("FILE/run.zarr", "not a folder"),
    ("FILE/sub/run.zarr", "not a directory"),
    ("FILE", "already exists"),
])
def test_unwritable_out_exits_2_with_one_line_before_training(tmp_path, out, match):
    (tmp_path / "FILE").write_text("not a folder")
    out = str(tmp_path / out)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "sam_diagnostics", "train", *TINY,
                             "--epochs", "1000", "--out", out], capture_output=True,
                            text=True, timeout=120, env=ENV)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], result.stderr
    assert time.monotonic() - start < 60  # 1000 epochs were not trained first
    assert (tmp_path / "FILE").read_text() == "not a folder"


# --------------------------------------------------------------------------------------------
# reading: non-runs, killed runs, versions
# --------------------------------------------------------------------------------------------


def test_open_run_refuses_what_is_not_a_run(tmp_path):
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    with pytest.raises(NotARunError, match="empty folder"):
        open_run(empty)
    foreign = tmp_path / "foreign.zarr"
    xr.Dataset({"x": ("t", [1.0])}).to_zarr(foreign, zarr_format=2)
    with pytest.raises(NotARunError, match="no schema_version"):
        open_run(foreign)
    text = tmp_path / "notes.nc"
    text.write_text("hello")
    with pytest.raises(NotARunError, match="not a netCDF file"):
        open_run(text)
    future = tmp_path / "future.zarr"
    xr.Dataset({"x": ("step", [1.0])}, attrs={"schema_version": 99}).to_zarr(
        future, zarr_format=2)
    with pytest.raises(NotARunError, match="upgrade sam_diagnostics"):
        open_run(future)
    wrong = tmp_path / "wrong.zarr"
    xr.Dataset({"loss": ("step", [1.0])}, coords={"step": [0]},
               attrs={"schema_version": schema.SCHEMA_VERSION}).to_zarr(wrong, zarr_format=2)
    with pytest.raises(NotARunError, match="does not follow the run schema: 'loss' has dims"):
        open_run(wrong)


def test_runs_written_before_schema_version_still_open(tmp_path):
    legacy = tmp_path / "legacy.zarr"
    xr.Dataset({"train_loss": ("step", [1.0])}, coords={"step": [0]},
               attrs={"sam_diagnostics_version": "0.1.0", "complete": 1}).to_zarr(
        legacy, zarr_format=2)
    assert open_run(legacy)["train_loss"].values.tolist() == [1.0]
    assert validate_run(legacy).notes[0].startswith("written before schema_version")


def test_incomplete_run_opens_and_says_so(tmp_path):
    path = tmp_path / "run.zarr"
    store = RunStore(path, flush_every=1)
    store.append(_step(0))
    with pytest.warns(IncompleteRunWarning, match="still being written by pid"):
        ds = open_run(path)
    assert ds.sizes["step"] == 1 and ds.attrs["complete"] == 0
    store.close(complete=True)


# --------------------------------------------------------------------------------------------
# self-describing data, validation
# --------------------------------------------------------------------------------------------


def test_every_stored_variable_and_coordinate_describes_itself(splits, tmp_path):
    ds = _finished_run(splits, tmp_path / "run.zarr")
    raw = xr.open_zarr(tmp_path / "run.zarr")  # plain xarray, no sam_diagnostics reader
    for store in (ds, raw):
        assert store.attrs["schema_version"] == schema.SCHEMA_VERSION
        assert store.attrs["Conventions"].startswith("CF-")
        for name, var in store.variables.items():
            assert var.attrs.get("long_name"), name
            assert "units" in var.attrs, name
    assert "[0, 1]" in raw["test_accuracy"].attrs["description"]
    assert set(ds.data_vars) <= set(schema.VARIABLES)


def test_validate_run_on_good_killed_and_broken_stores(splits, tmp_path):
    good = tmp_path / "good.zarr"
    _finished_run(splits, good)
    result = validate_run(good)
    assert result.ok and result.complete and result.steps == 2, str(result)

    killed = tmp_path / "killed.zarr"
    code = (
        "import os, torch\n"
        "from sam_diagnostics.data import load_dataset\n"
        "from sam_diagnostics.models import build_model\n"
        "from sam_diagnostics.record import Recorder\n"
        "s = load_dataset('digits', noise=0.3, seed=0, n_samples=120, val_fraction=0.0)\n"
        "m = build_model('linear', s.input_shape, s.num_classes, seed=0)\n"
        f"r = Recorder(m, {str(killed)!r}, probe=8, train=s.train, flush_every=1)\n"
        "r.step(); r.epoch_end()\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    result = validate_run(killed)
    assert result.ok and not result.complete and result.steps == 2
    assert any("incomplete" in n for n in result.notes)

    group = zarr.open_group(str(good), mode="r+", zarr_format=2)
    attrs = dict(group["loss"].attrs)
    attrs.pop("units")
    group["loss"].attrs.clear()
    group["loss"].attrs.update(attrs)
    zarr.consolidate_metadata(str(good), zarr_format=2)
    result = validate_run(good)
    assert not result.ok and "'loss' has no units" in result.problems
    broken = open_run(good).rename({"loss": "margin2"})
    broken["margin"] = broken["margin"].isel(view=0)
    problems = validate_run(broken).problems
    assert any("'margin' has dims" in p for p in problems)
    assert not validate_run(tmp_path / "missing.zarr").ok
    assert sd.validate_run is validate_run


def test_schema_docs_are_generated_from_the_table():
    text = (ROOT / "docs" / "schema.md").read_text()
    assert text == schema.markdown(), (
        "docs/schema.md is stale: python -c 'from sam_diagnostics.schema import "
        "write_markdown; write_markdown()'")
    for name in (*schema.VARIABLES, *schema.COORDS):
        assert f"| `{name}` |" in text


def test_schema_module_needs_no_torch():
    path = ROOT / "sam_diagnostics" / "schema.py"
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('s', {str(path)!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['s'] = m\n"
            "spec.loader.exec_module(m)\n"
            "assert 'torch' not in sys.modules and 'xarray' not in sys.modules\n"
            "print(m.SCHEMA_VERSION)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr


def test_whole_batch_m_has_one_converter():
    assert schema.m_to_disk(None) == 0 and schema.m_from_disk(0) is None
    for m in (1, 4, np.int64(2)):
        assert schema.m_from_disk(schema.m_to_disk(m)) == m
    assert schema.m_from_disk(2.0) == 2
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="m must be None"):
            schema.m_to_disk(bad)


def test_config_keys_and_run_names_exist_once():
    import sam_diagnostics.runs as runs
    import sam_diagnostics.summary as summary

    for module in ("cli", "store", "runs", "summary", "record", "train", "sweep"):
        source = (ROOT / "sam_diagnostics" / f"{module}.py").read_text()
        assert "CONFIG_KEYS: tuple" not in source and "def _run_name" not in source, module
    assert summary.CONFIG_KEYS is schema.CONFIG_KEYS is runs.CONFIG_KEYS
    text = json.dumps(list(schema.CONFIG_KEYS))
    assert "optimizer" in text


def test_reading_functions_name_bad_arguments(splits, tmp_path):
    ds = _finished_run(splits, tmp_path / "run.zarr")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sd.to_netcdf(ds, tmp_path / "missing" / "run.nc")
    for call in (lambda: open_run(123), lambda: validate_run(None),
                 lambda: sd.merge_runs([ds, 1])):
        with pytest.raises(TypeError, match="str or os.PathLike"):
            call()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(NotARunError):
        sd.merge_runs([tmp_path / "run.zarr", tmp_path / "notes.txt"])

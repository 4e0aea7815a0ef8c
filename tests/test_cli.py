"""The ``sam-diagnostics`` command line, end to end on tiny settings."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from sam_diagnostics import open_run
from sam_diagnostics.cli import main

TINY = ["--dataset", "digits", "--model", "mlp", "--width", "16", "--n-samples", "160",
        "--batch-size", "64", "--probe-size", "16", "--record-every", "1", "--no-progress",
        "--threads", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "sweep", "summary", "plot", "validate"):
        assert command in out
    assert main([]) == 2  # no command: help on stderr, status 2


def test_python_dash_m_and_console_script_help():
    for cmd in ([sys.executable, "-m", "sam_diagnostics", "--help"],
                [sys.executable, "-m", "sam_diagnostics.cli", "--help"]):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
        assert result.returncode == 0, result.stderr
        assert "sweep" in result.stdout and "summary" in result.stdout


def test_train_summary_plot_end_to_end(tmp_path, capsys):
    run = tmp_path / "run.zarr"
    assert main(["train", *TINY, "--optimizer", "sam", "--group-size", "1", "--noise", "0.3",
                 "--epochs", "2", "--out", str(run)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "best test acc" in out[0] and "sam" in out[0]
    ds = open_run(run)
    assert ds.sizes["step"] == 3 and ds.attrs["complete"] == 1
    assert ds.attrs["noise_rate"] == 0.3 and ds.attrs["optimizer"] == "sam"

    assert main(["summary", str(run)]) == 0
    out = capsys.readouterr().out
    assert "best test %" in out and "Mean ± std over seeds" in out and "sam" in out

    pytest.importorskip("sam_diagnostics.plots")
    figs = tmp_path / "figs"
    assert main(["plot", str(run), "--out", str(figs)]) == 0
    assert (figs / "accuracy.png").exists()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args, match", [
    (["train", "--dataset", "imagenet"], "invalid choice"),
    (["train", "--noise", "1.0"], "noise rate"),
    (["train", "--noise", "-0.1"], "noise rate"),
    (["train", "--noise", "lots"], "invalid float"),
    (["train", "--epochs", "0"], "epochs"),
    (["train", "--dataset", "cifar10"], "data-dir"),
    (["train", "--dataset", "cifar10", "--data-dir", "EMPTY"], "missing"),
    (["train", "--optimizer", "adam"], "invalid choice"),
    (["train", "--flush-every", "0"], "flush-every"),
    (["train"], "required: --out"),
    (["sweep", "--optimizers", "sgd,adam"], "unknown optimizer 'adam'"),
    (["sweep", "--seeds", "a-b"], "bad seed"),
    (["summary", "MISSING"], "no run or folder"),
    (["plot", "EMPTY", "--out", "figs"], "no runs"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_config_one_line_exit_2(args, match, tmp_path, capsys):
    (tmp_path / "EMPTY").mkdir()
    args = [str(tmp_path / a) if a in ("EMPTY", "MISSING") else a for a in args]
    if args[0] in ("train", "sweep") and "--out" not in args and args != ["train"]:
        args += ["--out", str(tmp_path / "out.zarr")]
    assert main(args) == 2
    assert match in _error_line(capsys)
    assert not (tmp_path / "out.zarr").exists()


def test_existing_out_needs_overwrite(tmp_path, capsys):
    run = tmp_path / "run.zarr"
    args = ["train", *TINY, "--epochs", "1", "--out", str(run)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists" in _error_line(capsys)
    assert main([*args, "--overwrite"]) == 0


def test_bad_config_in_a_real_process_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sam_diagnostics", "train", "--dataset", "cifar10", "--out",
         str(tmp_path / "x.zarr")], capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "data-dir" in result.stderr


def test_sigkill_keeps_every_finished_step(tmp_path):
    run = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "sam_diagnostics.cli", "train", *TINY, "--epochs", "100000",
           "--record-every", "0", "--record-every-steps", "2", "--flush-every", "1",
           "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    try:
        deadline = time.monotonic() + 90
        steps = 0
        while steps < 5:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the run did not record 5 steps in time"
            time.sleep(0.2)
            try:
                steps = open_run(run, load=False).sizes["step"]
            except (FileNotFoundError, ValueError, KeyError, OSError):
                steps = 0
        time.sleep(0.3)  # kill it somewhere in the middle of later work
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    ds = open_run(run)
    n = ds.sizes["step"]
    assert n >= 5
    np.testing.assert_array_equal(ds["step"].values, 2 * np.arange(n))
    assert ds.attrs["complete"] == 0
    for name, var in ds.data_vars.items():
        values = var.values[1:] if name == "batch_loss" else var.values
        assert np.isfinite(values).all(), name  # every kept step is complete
    assert zarr.open_group(str(run), mode="r")["loss"].chunks[0] > 1


def test_sweep_is_resumable_and_summarized(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", *TINY, "--epochs", "1", "--optimizers", "sgd,sam", "--seeds", "0-1",
            "--rho", "0.05", "0.1", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "6 runs, 0 already done, 6 to run" in text
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["sgd-seed0.zarr", "sgd-seed1.zarr",
                            *[f"sam-rho{r}-m1-seed{s}.zarr" for r in ("0.05", "0.1")
                              for s in (0, 1)]])

    assert main(args) == 0
    assert "6 runs, 6 already done, 0 to run" in capsys.readouterr().out

    # an unfinished run (killed) is redone, the others are kept
    group = zarr.open_group(str(out / "sgd-seed1.zarr"), mode="r+", zarr_format=2)
    group.attrs["complete"] = 0
    zarr.consolidate_metadata(str(out / "sgd-seed1.zarr"), zarr_format=2)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "6 runs, 5 already done, 1 to run" in text and "sgd-seed1" in text
    assert open_run(out / "sgd-seed1.zarr").attrs["complete"] == 1

    # the same folder with another configuration is refused
    changed = list(args)
    changed[changed.index("--epochs") + 1] = "2"
    assert main(changed) == 2
    assert "another configuration" in _error_line(capsys)

    assert main(["summary", str(out)]) == 0
    text = capsys.readouterr().out
    assert "±" in text and text.count("sam-rho") == 4
    lines = text.split("Mean ± std over seeds:")[1].strip().splitlines()
    assert len(lines) == 1 + 3  # header + sgd, sam rho 0.05, sam rho 0.1

    pytest.importorskip("sam_diagnostics.plots")
    assert main(["plot", str(out), "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "accuracy.png").exists()


# --------------------------------------------------------------------------------------------
# issue 11: every bad case is one line and exit 2, never a traceback
# --------------------------------------------------------------------------------------------


def test_summary_on_non_runs_in_a_real_process(tmp_path):
    (tmp_path / "empty.zarr").mkdir()
    (tmp_path / "notes.nc").write_text("not netCDF")
    env = {**ENV, "PYTHONPATH": os.getcwd()}
    for target, match in (("empty.zarr", "empty folder"), ("notes.nc", "not a netCDF file")):
        result = subprocess.run([sys.executable, "-m", "sam_diagnostics", "summary",
                                 str(tmp_path / target)], capture_output=True, text=True,
                                timeout=120, env=env)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "is not a run" in lines[0] and match in lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run.zarr"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("args, match", [
    (["summary", "NOTES"], "not a run"),
    (["summary", "EMPTY.zarr"], "empty folder"),
    (["summary", "FOREIGN.zarr"], "no schema_version"),
    (["plot", "NOTES", "--out", "figs"], "not a run"),
    (["plot", "RUN", "--out", "NOTES"], "not a folder"),
    (["summary", "RUN", "--csv", "MISSING/x.csv"], "does not exist"),
    (["train", "--out", "NOTES/run.zarr"], "not a folder"),
    (["train", "--out", "NOTES", "--overwrite"], "not a run store"),
    (["train", "--out", "NOTES/x/run.zarr"], "not a directory"),
    (["sweep", "--out", "NOTES"], "not a folder"),
    (["validate", "MISSING"], "no run or folder"),
])
def test_wrong_on_purpose_one_line_exit_2(args, match, tmp_path, capsys, finished_run):
    import xarray as xr

    (tmp_path / "EMPTY.zarr").mkdir()
    (tmp_path / "NOTES").write_text("notes")
    xr.Dataset({"x": ("t", [1.0])}).to_zarr(tmp_path / "FOREIGN.zarr", zarr_format=2)

    def path(a):
        for key in ("NOTES", "EMPTY.zarr", "FOREIGN.zarr", "MISSING"):
            if a.startswith(key):
                return str(tmp_path / a)
        return str(finished_run) if a == "RUN" else a

    args = [path(a) for a in args]
    if args[0] in ("train", "sweep"):
        args += [*TINY, "--epochs", "1000"]
    assert main(args) == 2
    assert match in _error_line(capsys)
    assert (tmp_path / "NOTES").read_text() == "notes"


def test_validate_command(finished_run, tmp_path, capsys):
    assert main(["validate", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert "ok (2 steps, complete)" in out
    (tmp_path / "notes.nc").write_text("x")
    assert main(["validate", str(finished_run), str(tmp_path / "notes.nc")]) == 1
    assert "INVALID" in capsys.readouterr().out


def test_sweep_leaves_a_run_that_another_writer_holds(tmp_path, capsys):
    from sam_diagnostics.store import RunStore

    out = tmp_path / "sweep"
    out.mkdir()
    held = RunStore(out / "sgd-seed0.zarr")  # another writer (a second lock holder)
    try:
        assert main(["sweep", *TINY, "--epochs", "1", "--optimizers", "sgd", "--seeds", "0-1",
                     "--out", str(out)]) == 0
        text = capsys.readouterr().out
        assert f"sgd-seed0.zarr: being written by pid {os.getpid()}" in text
        assert "2 runs, 1 already done, 1 to run" in text
        assert open_run(out / "sgd-seed1.zarr").attrs["complete"] == 1
        # the summary skips the store that holds no step yet, with a note on stderr
        assert main(["summary", str(out)]) == 0
        captured = capsys.readouterr()
        assert "sgd-seed1" in captured.out and "skipped" in captured.err
    finally:
        held.discard()


def test_sweep_leaves_a_run_started_meanwhile_to_its_writer(tmp_path, capsys, monkeypatch):
    import sam_diagnostics.sweep as sweep
    from sam_diagnostics.store import RunStore

    out = tmp_path / "sweep"
    held = []
    original = sweep.pending_runs

    def race(plan, **kwargs):  # another process takes the run right after planning
        todo = original(plan, **kwargs)
        held.append(RunStore(todo[0][1]))
        return todo

    monkeypatch.setattr(sweep, "pending_runs", race)
    try:
        assert main(["sweep", *TINY, "--epochs", "1", "--optimizers", "sgd", "--out",
                     str(out)]) == 0
        assert "sgd-seed0.zarr: skipped:" in capsys.readouterr().out
    finally:
        for store in held:
            store.discard()

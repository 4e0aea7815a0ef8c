"""Recorder, RunStore (zarr append with buffering), open_run, merge_runs, to_netcdf, summaries."""

import json
import pickle

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from sam_diagnostics.data import load_dataset
from sam_diagnostics.models import build_model
from sam_diagnostics.record import Recorder
from sam_diagnostics.runs import NotARunError, merge_runs, open_run, to_netcdf
from sam_diagnostics.schema import CONFIG_KEYS
from sam_diagnostics.store import RunStore
from sam_diagnostics.summary import group_summary, summary_table

PER_EXAMPLE = {
    "loss": ("step", "view", "example"),
    "margin": ("step", "view", "example"),
    "logit_scale": ("step", "view", "example"),
    "jacobian_norm": ("step", "view", "example"),
    "grad_norm": ("step", "view", "example"),
    "activation_norm": ("step", "view", "example", "layer"),
}
CURVES = ("train_loss", "test_accuracy", "clean_train_accuracy", "noisy_train_accuracy")


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits", noise=0.3, seed=0, n_samples=200, val_fraction=0.1)


def _config(seed=0, optimizer="sgd", rho=0.05):
    return {"optimizer": optimizer, "rho": rho, "m": 1, "lr": 0.05, "momentum": 0.9,
            "weight_decay": 0.0, "batch_size": 32, "epochs": 2, "seed": seed,
            "noise_rate": 0.3, "noise_mode": "symmetric", "dataset": "digits", "model": "mlp",
            "gamma_act": 0.01, "gamma_weight": 0.01}


def _run(splits, out, *, seed=0, epochs=2, probe=24, keep=None, flush_every=16, **kw):
    """A tiny SGD loop instrumented with the Recorder; returns the recorder."""
    model = build_model("mlp", splits.input_shape, splits.num_classes, width=16, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    n = len(splits.train)
    steps_per_epoch = (n + 63) // 64
    rec = Recorder(model, out, probe=probe, train=splits.train, test=splits.test,
                   val=splits.val, config=_config(seed), steps_per_epoch=steps_per_epoch,
                   keep=keep, flush_every=flush_every, probe_seed=seed, **kw)
    with rec:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(steps_per_epoch):
                idx = perm[i * 64:(i + 1) * 64]
                loss = torch.nn.functional.cross_entropy(model(splits.train.inputs[idx]),
                                                         splits.train.labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                rec.step(loss)
    return rec


def test_schema_has_every_spec_variable_and_coordinate(splits, tmp_path):
    rec = _run(splits, tmp_path / "run.zarr")
    ds = open_run(tmp_path / "run.zarr")
    assert ds.sizes["step"] == 3 and ds.sizes["example"] == 24
    assert list(ds["view"].values) == ["sgd", "sam"]
    assert list(ds["step"].values) == [0, 3, 6]  # 180 examples, batch 64
    np.testing.assert_array_equal(ds["epoch"].values, [0.0, 1.0, 2.0])
    for name, dims in PER_EXAMPLE.items():
        assert ds[name].dims == dims, name
    assert ds["last_layer_weight_norm"].dims == ("step",)
    assert ds["weight_norm"].dims == ("step", "module")
    for name in CURVES:
        assert ds[name].dims == ("step",)
        assert np.isfinite(ds[name].values).all(), name
    for name in ("is_noisy", "label", "true_label"):
        assert ds[name].dims == ("example",) and name in ds.coords
    assert ds["is_noisy"].dtype == bool and ds["is_noisy"].any() and not ds["is_noisy"].all()
    noisy = ds["is_noisy"].values
    assert (ds["label"].values[noisy] != ds["true_label"].values[noisy]).all()
    assert (ds["label"].values[~noisy] == ds["true_label"].values[~noisy]).all()
    # example ids are the data set's stable ids
    assert set(ds["example"].values) <= set(splits.train.example_ids.tolist())
    assert list(ds["layer"].values) == ["head"]
    for key, value in _config().items():
        assert ds.attrs[key] == value
    assert ds.attrs["complete"] == 1 and ds.attrs["sam_diagnostics_version"]
    for value in ds.attrs.values():
        assert isinstance(value, (int, float, str))
    assert rec.store.steps_written == 3


def test_zarr_round_trip_is_bit_exact(splits, tmp_path):
    rec = _run(splits, tmp_path / "run.zarr", keep=True)
    in_memory = rec.dataset()
    stored = open_run(tmp_path / "run.zarr")
    xr.testing.assert_identical(stored, in_memory)
    for name in PER_EXAMPLE:
        assert stored[name].dtype == np.float32
        assert stored[name].values.tobytes() == in_memory[name].values.tobytes()


def test_curves_measure_memorization_against_observed_labels(splits):
    rec = _run(splits, None, epochs=1)
    ds = rec.dataset()
    model = rec.model
    with torch.no_grad():
        pred = model(splits.train.inputs).argmax(1)
    correct = (pred == splits.train.labels).numpy()
    noisy = splits.train.is_noisy.numpy()
    last = ds.isel(step=-1)
    assert float(last["noisy_train_accuracy"]) == pytest.approx(correct[noisy].mean())
    assert float(last["clean_train_accuracy"]) == pytest.approx(correct[~noisy].mean())
    with torch.no_grad():
        test_pred = model(splits.test.inputs).argmax(1)
    assert float(last["test_accuracy"]) == pytest.approx(
        (test_pred == splits.test.labels).float().mean().item())
    assert np.isnan(ds["batch_loss"].values[0]) and np.isfinite(ds["batch_loss"].values[1:]).all()


def test_recording_leaves_model_and_rng_untouched(splits):
    model = build_model("mlp", splits.input_shape, splits.num_classes, width=16, seed=0)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    rec = Recorder(model, None, probe=16, train=splits.train, test=splits.test)
    rec.record()
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


def test_buffered_appends_and_chunking(splits, tmp_path):
    path = tmp_path / "run.zarr"
    model = build_model("linear", splits.input_shape, splits.num_classes, seed=0)
    rec = Recorder(model, path, probe=16, train=splits.train, every_epochs=1,
                   flush_every=3, flush_seconds=1e9, chunk_steps=4)

    def epoch():
        rec.step()
        rec.epoch_end()

    # the first record is written at once: the store is never empty once recording began
    assert rec.store.steps_written == 1
    assert open_run(path, warn=False).sizes["step"] == 1
    epoch()
    epoch()
    assert rec.store.steps_written == 1 and len(rec.store) == 3
    epoch()  # third buffered record: one append
    assert rec.store.steps_written == 4
    assert open_run(path, warn=False).sizes["step"] == 4
    for _ in range(2):
        epoch()
    assert rec.store.steps_written == 4 and open_run(path, warn=False).sizes["step"] == 4
    epoch()
    assert rec.store.steps_written == 7 and open_run(path, warn=False).sizes["step"] == 7
    rec.epoch_end()  # no step since the last record: nothing new to record
    assert len(rec.store) == 7
    rec.close()
    ds = open_run(path)
    assert ds.sizes["step"] == 7 and ds.attrs["complete"] == 1
    np.testing.assert_array_equal(ds["epoch"].values, np.arange(7.0))
    group = zarr.open_group(str(path), mode="r")
    assert group["loss"].chunks[0] == 4 and group["train_loss"].chunks == (4,)


def test_store_flushes_at_interpreter_exit(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "exit.zarr"
    code = (
        "import numpy as np, xarray as xr\n"
        "from sam_diagnostics.store import RunStore\n"
        f"store = RunStore({str(path)!r}, flush_every=100, flush_seconds=1e9)\n"
        "for s in range(3):\n"
        "    store.append(xr.Dataset({'x': ('step', [float(s)])}, coords={'step': [s]}))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    ds = open_run(path)
    np.testing.assert_array_equal(ds["x"].values, [0.0, 1.0, 2.0])
    assert ds.attrs["complete"] == 0


def test_step_schedule_and_fractional_epochs(splits):
    model = build_model("linear", splits.input_shape, splits.num_classes, seed=0)
    rec = Recorder(model, None, probe=8, train=splits.train, every_steps=2, every_epochs=1,
                   steps_per_epoch=3)
    for _ in range(6):
        rec.step(1.0)
    ds = rec.dataset()
    assert list(ds["step"].values) == [0, 2, 3, 4, 6]
    np.testing.assert_allclose(ds["epoch"].values, [0, 2 / 3, 1, 4 / 3, 2])


def test_existing_path_needs_overwrite_and_only_stores_are_deleted(splits, tmp_path):
    model = build_model("linear", splits.input_shape, splits.num_classes, seed=0)
    _run(splits, tmp_path / "run.zarr", epochs=1)
    with pytest.raises(FileExistsError):
        Recorder(model, tmp_path / "run.zarr", probe=8, train=splits.train)
    Recorder(model, tmp_path / "run.zarr", probe=8, train=splits.train, overwrite=True).close()
    assert open_run(tmp_path / "run.zarr").sizes["step"] == 1
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(FileExistsError, match="not a zarr store"):
        RunStore(precious, overwrite=True)
    assert (precious / "thesis.tex").exists()


def test_open_run_never_unpickles(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("evil.nc", "evil.pkl"):
        (tmp_path / name).write_bytes(pickle.dumps(Evil()))
        with pytest.raises(Exception):  # noqa: B017 - any refusal is fine, execution is not
            open_run(tmp_path / name)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        open_run(tmp_path / "missing.zarr")
    (tmp_path / "folder").mkdir()
    with pytest.raises(NotARunError, match="empty folder"):
        open_run(tmp_path / "folder")


def test_store_killed_before_first_write_says_so(tmp_path):
    path = tmp_path / "dead.zarr"
    path.mkdir()
    (path / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (path / ".zattrs").write_text(json.dumps({"sam_diagnostics_version": "0.1.0"}))
    with pytest.raises(ValueError, match="no finished step"):
        open_run(path)


def test_netcdf_export_reopens_equal(splits, tmp_path):
    _run(splits, tmp_path / "run.zarr")
    ds = open_run(tmp_path / "run.zarr")
    out = to_netcdf(tmp_path / "run.zarr", tmp_path / "run.nc")
    back = open_run(out)
    xr.testing.assert_identical(back, ds)
    assert back["is_noisy"].dtype == bool
    with pytest.raises(FileExistsError):
        to_netcdf(ds, out)
    to_netcdf(ds, out, overwrite=True)


def test_merge_runs_along_run_with_config_coords(splits, tmp_path):
    _run(splits, tmp_path / "a.zarr", seed=0, epochs=2)
    _run(splits, tmp_path / "b.zarr", seed=1, epochs=1, probe=20)
    merged = merge_runs([tmp_path / "a.zarr", tmp_path / "b.zarr"])
    assert list(merged["run"].values) == ["a", "b"]
    assert merged.sizes["step"] == 3 and merged.sizes["example"] == 24
    for key in ("optimizer", "rho", "m", "seed", "dataset", "model", "noise_rate"):
        assert merged[key].dims == ("run",) and key in merged.coords, key
    assert list(merged["seed"].values) == [0, 1]
    # steps: outer join; the shorter run is NaN-padded
    assert np.isnan(merged["test_accuracy"].sel(run="b").values[-1])
    assert np.isfinite(merged["test_accuracy"].sel(run="a").values).all()
    # per-run probe sets: ids and noise flags over (run, example), padding marked
    for name in ("example_id", "is_noisy", "label", "true_label"):
        assert merged[name].dims == ("run", "example"), name
    assert merged["is_noisy"].dtype == bool
    b = merged.sel(run="b")
    assert (b["example_id"].values[20:] == -1).all()
    assert np.isnan(b["loss"].values[..., 20:]).all()
    single = open_run(tmp_path / "b.zarr")
    np.testing.assert_array_equal(b["example_id"].values[:20], single["example"].values)
    np.testing.assert_array_equal(b["loss"].values[:2, :, :20], single["loss"].values)
    assert merged["epoch"].dims == ("run", "step")
    # a folder is the same as its runs; the result exports to netCDF and back
    xr.testing.assert_identical(merge_runs(tmp_path), merged)
    to_netcdf(merged, tmp_path / "merged.nc")
    xr.testing.assert_identical(open_run(tmp_path / "merged.nc"), merged)


def test_merge_runs_accepts_datasets_and_feeds_plots(splits, tmp_path):
    plots = pytest.importorskip("sam_diagnostics.plots")
    a = _run(splits, None, seed=0, epochs=1).dataset()
    b = _run(splits, None, seed=1, epochs=1).dataset()
    merged = merge_runs([a, b], names=["x", "y"])
    assert list(merged["run"].values) == ["x", "y"]
    assert set(CONFIG_KEYS) - {"complete"} <= set(merged.coords)
    table = plots.run_table(merged)
    assert list(table["seed"]) == [0, 1]


def test_summary_tables(splits):
    def fake(seed, accs, clean, noisy):
        n = len(accs)
        ds = xr.Dataset(
            {"test_accuracy": ("step", accs), "clean_train_accuracy": ("step", clean),
             "noisy_train_accuracy": ("step", noisy)},
            coords={"step": np.arange(n) * 10, "epoch": ("step", np.arange(n, dtype=float))},
            attrs={**_config(seed, optimizer="sam"), "complete": 1})
        return ds

    runs = [fake(0, [0.1, 0.6, 0.5], [0.1, 0.7, 0.9], [0.0, 0.2, 0.8]),
            fake(1, [0.1, 0.4, 0.8], [0.1, 0.5, 0.9], [0.0, 0.1, 0.3])]
    table = summary_table(merge_runs(runs))
    assert list(table["best_test_acc"]) == [0.6, 0.8]
    assert list(table["best_epoch"]) == [1.0, 2.0]
    assert list(table["final_test_acc"]) == [0.5, 0.8]
    assert list(table["clean_train_acc_at_best"]) == [0.7, 0.9]
    assert list(table["noisy_train_acc_at_best"]) == [0.2, 0.3]
    groups = group_summary(table)
    assert len(groups) == 1 and groups["n_seeds"].iloc[0] == 2
    assert groups["best_test_acc_mean"].iloc[0] == pytest.approx(0.7)
    assert groups["best_test_acc_std"].iloc[0] == pytest.approx(np.std([0.6, 0.8], ddof=1))


def test_probe_slices_and_divergence(splits):
    model = build_model("mlp", splits.input_shape, splits.num_classes, width=16, seed=0)
    sliced = Recorder(model, None, probe=24, train=splits.train, test=splits.test,
                      probe_batch_size=8).dataset()
    whole = Recorder(model, None, probe=24, train=splits.train, test=splits.test).dataset()
    xr.testing.assert_allclose(sliced, whole)
    rec = Recorder(model, None, probe=24, train=splits.train, test=splits.test)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="recording NaN"):
        ds = rec.record()  # a diverged model is recorded as NaN, training is not stopped
    assert np.isnan(ds["loss"].values).all()
    assert float(ds["test_accuracy"][0]) == 0.0


# --------------------------------------------------------------------------------------------
# issue 11: any map-style data set; bad inputs raise before anything is created or changed
# --------------------------------------------------------------------------------------------


def test_recorder_takes_plain_tensor_datasets(splits, tmp_path):
    from torch.utils.data import TensorDataset

    model = build_model("mlp", splits.input_shape, splits.num_classes, width=16, seed=0)
    x, y = splits.train.inputs, splits.train.labels
    plain = TensorDataset(x, y)  # (x, y) items: ids are positions, no noise information
    rec = Recorder(model, tmp_path / "plain.zarr", probe=12, train=plain,
                   test=TensorDataset(splits.test.inputs, splits.test.labels))
    rec.close()
    ds = open_run(tmp_path / "plain.zarr")
    assert ds.sizes["example"] == 12 and set(ds["example"].values) <= set(range(len(y)))
    assert not ds["is_noisy"].values.any() and (ds["true_label"].values == -1).all()
    assert "clean_train_accuracy" not in ds and "noisy_train_accuracy" not in ds
    assert np.isfinite(ds["train_accuracy"].values).all()
    ids = splits.train.example_ids
    with_ids = TensorDataset(x, y, ids)  # (x, y, id) items plus the masks as arguments
    rec = Recorder(model, None, probe=12, train=with_ids, noise_mask=splits.train.is_noisy,
                   true_labels=splits.train.true_labels)
    ds = rec.dataset()
    assert set(ds["example"].values) <= set(ids.tolist())
    assert ds["is_noisy"].values.any() and (ds["true_label"].values >= 0).all()
    assert np.isfinite(ds["noisy_train_accuracy"].values).all()
    # the same probe set as with the NoisyDataset itself
    same = Recorder(model, None, probe=12, train=splits.train).dataset()
    np.testing.assert_array_equal(ds["example"].values, same["example"].values)
    np.testing.assert_array_equal(ds["loss"].values, same["loss"].values)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(model="not a model"), TypeError, "torch.nn.Module"),
    (dict(probe=0), ValueError, "probe size"),
    (dict(probe=-3), ValueError, "probe size"),
    (dict(probe=None), TypeError, "probe"),
    (dict(train=[1, 2, 3]), TypeError, r"\(x, y\)"),
    (dict(train=object()), TypeError, "map-style"),
    (dict(m=-1), ValueError, "m must be"),
    (dict(m=1.5), ValueError, "m must be"),
    (dict(rho=float("inf")), ValueError, "rho"),
    (dict(every_steps=1.5), ValueError, "every_steps"),
    (dict(eval_batch_size=0), ValueError, "eval_batch_size"),
    (dict(config=[("rho", 1)]), TypeError, "config"),
    (dict(out=3), TypeError, "out must be"),
    (dict(noise_mask=[True]), ValueError, "noise_mask|is_noisy"),
])
def test_bad_recorder_inputs_raise_before_any_state_change(splits, tmp_path, kwargs, error,
                                                           match):
    model = build_model("mlp", splits.input_shape, splits.num_classes, width=16, seed=0)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    args = dict(model=model, out=tmp_path / "run.zarr", probe=8, train=splits.train)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        Recorder(args.pop("model"), args.pop("out"), **args)
    assert list(tmp_path.iterdir()) == []  # no store, no lock
    assert model.training and torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

"""The instrumented training loop (`train`, `TrainConfig`) and the Lightning callback."""

import sys

import numpy as np
import pytest
import torch
import xarray as xr

from sam_diagnostics import open_run
from sam_diagnostics.train import ConfigError, TrainConfig, train

TINY = dict(dataset="digits", model="mlp", width=16, n_samples=160, epochs=2, batch_size=64,
            record_every=1,
            probe_size=16, seed=0)


def test_defaults_follow_the_study_notes():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.momentum, cfg.batch_size, cfg.weight_decay) == (0.05, 0.9, 128, 0.0)
    assert (cfg.noise_rate, cfg.m, cfg.probe_size, cfg.record_every) == (0.3, 1, 256, 10)
    assert cfg.validate() is cfg


def test_train_records_every_epoch_and_marks_completion(tmp_path):
    out = tmp_path / "run.zarr"
    ds = train(TrainConfig(**TINY, optimizer="sam"), out, progress=False)
    stored = open_run(out)
    xr.testing.assert_identical(ds, stored)
    # 144 training examples (10% validation), batch 64 -> 3 steps per epoch
    assert list(ds["step"].values) == [0, 3, 6]
    np.testing.assert_array_equal(ds["epoch"].values, [0.0, 1.0, 2.0])
    assert ds.attrs["complete"] == 1 and ds.attrs["optimizer"] == "sam"
    assert ds.attrs["n_samples"] == 160 and ds.attrs["steps_per_epoch"] == 3
    assert ds.sizes["example"] == 16 and bool(ds["is_noisy"].any())
    for name in ("loss", "logit_scale", "jacobian_norm", "test_accuracy", "val_accuracy"):
        assert np.isfinite(ds[name].values).all(), name
    with pytest.raises(FileExistsError):
        train(TrainConfig(**TINY), out, progress=False)


def test_train_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = train(TrainConfig(**TINY, optimizer="jsam"), progress=False)
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(12345)  # the caller's global seed must not matter
    b = train(TrainConfig(**TINY, optimizer="jsam"), progress=False)
    xr.testing.assert_identical(a, b)
    c = train(TrainConfig(**{**TINY, "seed": 1}, optimizer="jsam"), progress=False)
    assert not np.array_equal(a["loss"].values, c["loss"].values)


@pytest.mark.parametrize("optimizer", ["sgd", "sam", "lsam", "jsam", "regsgd"])
def test_every_optimizer_trains(optimizer):
    ds = train(TrainConfig(**{**TINY, "epochs": 1, "m": 0 if optimizer == "sam" else 1},
                           optimizer=optimizer), progress=False)
    assert ds.attrs["optimizer"] == optimizer and ds.sizes["step"] == 2
    assert np.isfinite(ds["batch_loss"].values[1:]).all()


def test_step_schedule_and_final_record():
    cfg = TrainConfig(**{**TINY, "epochs": 2, "record_every": 0}, record_every_steps=4)
    ds = train(cfg, progress=False)
    # steps 0, 4 by schedule, and the final state (step 6) always
    assert list(ds["step"].values) == [0, 4, 6]
    np.testing.assert_allclose(ds["epoch"].values, [0, 4 / 3, 2])


@pytest.mark.parametrize("change, match", [
    (dict(dataset="imagenet"), "unknown dataset"),
    (dict(model="vit"), "unknown model"),
    (dict(optimizer="adam"), "unknown optimizer"),
    (dict(noise_rate=1.0), "noise rate"),
    (dict(noise_rate=-0.1), "noise rate"),
    (dict(lr=0.0), "lr"),
    (dict(epochs=0), "epochs"),
    (dict(m=-1), "m must"),
    (dict(dataset="cifar10"), "data-dir"),
    (dict(dataset="cifar10", data_dir="/nonexistent/cifar"), "not a folder"),
    (dict(device="tpu:0:1"), "device"),
])
def test_bad_config_is_a_config_error(change, match):
    with pytest.raises(ConfigError, match=match):
        train(TrainConfig(**{**TINY, **change}), progress=False)


def test_cuda_device_without_cuda_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="not available"):
        TrainConfig(device="cuda").validate()


def test_config_from_mapping_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown config keys: colour"):
        train({"colour": "blue"}, progress=False)
    assert TrainConfig.from_dict({**TINY, "complete": 1}).n_samples == 160


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_on_cuda(tmp_path):  # pragma: no cover - GPU machines only
    ds = train(TrainConfig(**TINY, optimizer="sam", device="cuda"), tmp_path / "gpu.zarr",
               progress=False)
    assert np.isfinite(ds["jacobian_norm"].values).all()


@pytest.mark.filterwarnings("ignore:.*LeafSpec")
def test_lightning_callback(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader

    from sam_diagnostics.data import load_dataset
    from sam_diagnostics.integrations.lightning import DiagnosticsCallback
    from sam_diagnostics.models import build_model

    splits = load_dataset("digits", noise=0.3, seed=0, n_samples=160)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build_model("mlp", splits.input_shape, 10, width=16, seed=0)

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    callback = DiagnosticsCallback(tmp_path / "pl.zarr", probe=16, train=splits.train,
                                   test=splits.test, model_attr="model",
                                   config={"optimizer": "sgd", "seed": 0})
    trainer = pl.Trainer(max_epochs=2, callbacks=[callback], accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Module(), DataLoader(splits.train, batch_size=64, shuffle=True))
    ds = open_run(tmp_path / "pl.zarr")
    assert list(ds["step"].values) == [0, 3, 6]
    np.testing.assert_array_equal(ds["epoch"].values, [0.0, 1.0, 2.0])
    assert ds.attrs["complete"] == 1 and ds.attrs["optimizer"] == "sgd"
    assert np.isfinite(ds["batch_loss"].values[1:]).all()
    assert np.isfinite(ds["logit_scale"].values).all()


def test_the_store_is_taken_before_the_data_are_loaded(tmp_path, monkeypatch):
    train_module = sys.modules["sam_diagnostics.train"]
    from sam_diagnostics.store import RunStore, StoreLockedError

    def never(*args, **kwargs):
        raise AssertionError("the data were loaded before the output was checked")

    monkeypatch.setattr(train_module, "load_dataset", never)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        train(TrainConfig(**TINY), tmp_path / "file" / "run.zarr", progress=False)
    held = RunStore(tmp_path / "busy.zarr")
    try:
        with pytest.raises(StoreLockedError, match="being written by another process"):
            train(TrainConfig(**TINY), tmp_path / "busy.zarr", progress=False, overwrite=True)
    finally:
        held.discard()
    with pytest.raises(TypeError, match="out must be a path"):
        train(TrainConfig(**TINY), 42, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_failed_start_leaves_no_empty_store(tmp_path, monkeypatch):
    train_module = sys.modules["sam_diagnostics.train"]

    def broken(*args, **kwargs):
        raise ValueError("cannot read the data")

    monkeypatch.setattr(train_module, "load_dataset", broken)
    with pytest.raises(ConfigError, match="cannot read the data"):
        train(TrainConfig(**TINY), tmp_path / "run.zarr", progress=False)
    assert list(tmp_path.iterdir()) == []

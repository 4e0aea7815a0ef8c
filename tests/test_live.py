"""Live scalars: live_summary of a record, the TensorBoard sink read back, callable sinks."""

import math

import numpy as np
import pytest
import torch
from tiny_runs import tiny_run, tiny_splits

from sam_diagnostics import Probe
from sam_diagnostics.live import (
    CallbackSink,
    TensorBoardSink,
    as_sinks,
    close_sinks,
    live_summary,
    log_record,
)


@pytest.fixture(scope="module")
def run():
    return tiny_run(tiny_splits(), None, epochs=2).dataset()


def test_summary_matches_the_dataset_by_hand(run):
    rec = run.isel(step=[-1])
    s = live_summary(rec)
    one = run.isel(step=-1)
    noisy = one["is_noisy"].values
    ls = one["logit_scale"]
    clean_sgd = ls.sel(view="sgd").values[~noisy].mean()
    noisy_sam = ls.sel(view="sam").values[noisy].mean()
    assert s["logit_scale/clean_sgd"] == pytest.approx(clean_sgd)
    assert s["logit_scale/noisy_sam"] == pytest.approx(noisy_sam)
    assert s["logit_scale_ratio/noisy"] == pytest.approx(
        noisy_sam / ls.sel(view="sgd").values[noisy].mean())
    jn = one["jacobian_norm"]
    assert s["jacobian_norm_ratio/clean"] == pytest.approx(
        jn.sel(view="sam").values[~noisy].mean() / jn.sel(view="sgd").values[~noisy].mean())
    layer = str(one["layer"].values[0])
    assert s[f"activation_norm/{layer}"] == pytest.approx(
        one["activation_norm"].sel(view="sgd", layer=layer).values.mean())
    assert s["weight_norm/last_layer"] == pytest.approx(float(one["last_layer_weight_norm"]))
    for module in one["module"].values:
        assert f"weight_norm/{module}" in s
    for name in ("accuracy/test", "accuracy/clean_train", "accuracy/noisy_train", "loss/train",
                 "loss/batch"):
        assert math.isfinite(s[name])
    assert s["accuracy/test"] == pytest.approx(float(one["test_accuracy"]))
    assert all(isinstance(v, float) for v in s.values())


def test_summary_of_a_probe_measurement_and_rejections(run):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ds = Probe(net).measure(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), rho=0.05)
    s = live_summary(ds)  # no is_noisy: one "all" subset
    assert {"logit_scale/all_sgd", "logit_scale_ratio/all", "jacobian_norm_ratio/all"} <= set(s)
    assert not any(k.startswith("accuracy/") for k in s)
    with pytest.raises(ValueError, match="one record"):
        live_summary(run)
    with pytest.raises(TypeError):
        live_summary(run["logit_scale"])


def test_tensorboard_event_file_reads_back(run, tmp_path):
    pytest.importorskip("tensorboard")  # the [hf] extra
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path / "tb")
    sent = {}
    for i in range(run.sizes["step"]):
        rec = run.isel(step=[i])
        sent[int(rec["step"].values[0])] = log_record(rec, [sink])
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"sd/logit_scale_ratio/clean", "sd/logit_scale_ratio/noisy", "sd/accuracy/test",
            "sd/jacobian_norm_ratio/clean", "sd/weight_norm/last_layer"} <= tags
    events = acc.Scalars("sd/logit_scale_ratio/clean")
    assert [e.step for e in events] == sorted(sent)
    for e in events:
        assert e.value == pytest.approx(sent[e.step]["logit_scale_ratio/clean"], rel=1e-6)
    # NaN values are not written (TensorBoard cannot draw them)
    assert all(np.isfinite(e.value) for t in tags for e in acc.Scalars(t))


def test_callable_sinks_prefix_and_failures(run):
    seen = []
    sinks = as_sinks([lambda s, step: seen.append((step, s)),
                      CallbackSink(lambda s, step: seen.append((step, s)), prefix="sd/",
                                   finite_only=True)])
    assert len(sinks) == 2
    rec = run.isel(step=[-1])
    log_record(rec, sinks)
    step = int(run["step"].values[-1])
    assert [st for st, _ in seen] == [step, step]
    assert all(k.startswith("sd/") for k in seen[1][1])

    class Broken:
        def log(self, scalars, step):
            raise RuntimeError("logger down")

    with pytest.warns(RuntimeWarning, match="logger down"):
        log_record(rec, [Broken()], step=5)
    with pytest.raises(TypeError):
        as_sinks(3)
    close_sinks(sinks)  # sinks without close/flush are fine


@pytest.mark.filterwarnings("ignore:.*LeafSpec")
def test_lightning_callback_mirrors_live_scalars(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers.logger import Logger
    from torch.utils.data import DataLoader

    from sam_diagnostics.integrations.lightning import DiagnosticsCallback
    from sam_diagnostics.models import build_model

    splits = tiny_splits()

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

    class Capture(Logger):
        name, version = "capture", 0
        metrics: list = []

        def log_metrics(self, metrics, step=None):
            self.metrics.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    seen = []
    logger = Capture()
    callback = DiagnosticsCallback(None, probe=16, train=splits.train, test=splits.test,
                                   model_attr="model", live=lambda s, step: seen.append(step))
    trainer = pl.Trainer(max_epochs=2, callbacks=[callback], accelerator="cpu", logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Module(), DataLoader(splits.train, batch_size=64, shuffle=True))
    steps = callback.dataset["step"].values.tolist()
    assert seen == steps
    ours = [(step, m) for step, m in logger.metrics if "sd/accuracy/test" in m]
    assert [step for step, _ in ours] == steps
    assert all(k.startswith("sd/") and math.isfinite(v) for _, m in ours for k, v in m.items())


def test_recorder_mirrors_every_record_to_live_sinks(tmp_path):
    """``Recorder(live=...)``: each record's scalars reach the sinks; the store keeps everything."""
    got = []
    rec = tiny_run(tiny_splits(), tmp_path / "run.zarr", optimizer="sam", epochs=2,
                   live=lambda scalars, step: got.append((step, scalars)))
    ds = rec.dataset()
    assert [s for s, _ in got] == [int(v) for v in ds["step"].values]
    # at step 0 no batch has been seen yet: its batch loss is NaN, everything else is finite
    assert all(math.isfinite(v) for i, (_, sc) in enumerate(got) for k, v in sc.items()
               if not (i == 0 and k == "loss/batch"))
    assert any("logit_scale" in k for k in got[-1][1])

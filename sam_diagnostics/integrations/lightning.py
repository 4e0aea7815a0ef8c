"""A PyTorch Lightning callback that records a run with :class:`~sam_diagnostics.Recorder`.

Needs the optional extra: ``pip install sam-diagnostics[lightning]``.

Example
-------
::

    from sam_diagnostics.integrations.lightning import DiagnosticsCallback

    callback = DiagnosticsCallback("run.zarr", probe=256, train=splits.train, test=splits.test,
                                   config={"optimizer": "sgd", "seed": 0})
    trainer = lightning.Trainer(max_epochs=100, callbacks=[callback])
    trainer.fit(module, loader)

The probed model is the ``LightningModule`` itself (its ``forward`` must return logits), or its
attribute named by ``model_attr`` (e.g. ``"model"`` for ``self.model = build_model(...)``).
Steps follow ``trainer.global_step`` (optimizer steps, so gradient accumulation is counted
right); ``batch_loss`` reads the ``loss`` that ``training_step`` returns. Only the global-zero
rank records for now; recording each rank's share of the probe set into one store is the
distributed design of SPEC section 6, left to a later issue.

Live scalars (:mod:`sam_diagnostics.live`: clean/noisy logit scale and its SAM/SGD ratio,
norms, accuracies) go, at every record, to ``live=`` (a TensorBoard log directory, a
``fn(scalars, step)`` or a sink) and, with ``log_to_trainer=True``, to the Trainer's own
loggers (``trainer.loggers``) under ``sd/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the standalone package name
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as err:
        raise ImportError(
            "sam_diagnostics.integrations.lightning needs PyTorch Lightning: "
            "pip install 'sam-diagnostics[lightning]'"
        ) from err

from torch import Tensor

from ..data import NoisyDataset
from ..live import CallbackSink, as_sinks, close_sinks, log_record
from ..record import Recorder
from ..store import RunStore

__all__ = ["DiagnosticsCallback"]


class DiagnosticsCallback(Callback):
    """Record probe diagnostics and training curves while a ``Trainer`` fits.

    Parameters
    ----------
    out : path, RunStore or None
        The zarr store to create (``None``: in memory, see :attr:`dataset`).
    probe : NoisyDataset or int
        The probe set or its size (then drawn from ``train``).
    model_attr : str, optional
        Probe ``getattr(pl_module, model_attr)`` instead of the module itself.
    live : path, callable, sink or list, optional
        Where to mirror the live scalars of every record
        (see :func:`~sam_diagnostics.live.as_sinks`).
    log_to_trainer : bool
        Also send them to ``trainer.loggers`` (``logger.log_metrics``), prefixed ``sd/``.
    **recorder_options
        Everything else :class:`~sam_diagnostics.record.Recorder` takes (``train``, ``test``,
        ``val``, ``config``, ``every_epochs``, ``every_steps``, ``rho``, ``m``, ...).
    """

    def __init__(self, out: str | PathLike | RunStore | None,
                 probe: NoisyDataset | int = 256, *, model_attr: str | None = None,
                 train: NoisyDataset | None = None, test: NoisyDataset | None = None,
                 val: NoisyDataset | None = None, config: Mapping[str, Any] | None = None,
                 live: Any = None, log_to_trainer: bool = True, **recorder_options: Any):
        super().__init__()
        self.out = out
        self.probe = probe
        self.model_attr = model_attr
        self.options = dict(train=train, test=test, val=val, config=config, **recorder_options)
        self.recorder: Recorder | None = None
        self.sinks = as_sinks(live)
        self.log_to_trainer = log_to_trainer
        self._trainer = None

    def _emit(self, ds) -> None:
        if ds is None:
            return
        sinks = list(self.sinks)
        if self.log_to_trainer and self._trainer is not None:
            for logger in getattr(self._trainer, "loggers", []):
                sinks.append(CallbackSink(lambda s, step, lg=logger: lg.log_metrics(s, step),
                                          prefix="sd/", finite_only=True))
        if sinks:
            log_record(ds, sinks)

    def _active(self, trainer) -> bool:
        return self.recorder is not None and trainer.is_global_zero

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or self.recorder is not None:
            return
        model = getattr(pl_module, self.model_attr) if self.model_attr else pl_module
        self._trainer = trainer
        options = dict(self.options)
        record_initial = options.pop("record_initial", True)
        self.recorder = Recorder(model, self.out, self.probe, record_initial=False, **options)
        if record_initial:
            self._emit(self.recorder.record())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._active(trainer):
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        loss = loss if isinstance(loss, Tensor) else None
        rec = self.recorder
        while rec.global_step < trainer.global_step:
            self._emit(rec.step(loss))
            loss = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._active(trainer):
            self._emit(self.recorder.epoch_end())

    def on_train_end(self, trainer, pl_module) -> None:
        if self._active(trainer):
            rec = self.recorder
            if rec.last_recorded_step != rec.global_step:
                self._emit(rec.record())
            rec.close(complete=True)
            close_sinks(self.sinks)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._active(trainer):
            self.recorder.close(complete=False)

    @property
    def dataset(self):
        """The recorded run (``None`` before training started)."""
        return None if self.recorder is None else self.recorder.dataset()

"""Record a training run as one ``xarray.Dataset`` (SPEC section 3), streamed to zarr.

The schema of a stored run
--------------------------
dims
    ``step`` (recorded optimizer steps), ``example`` (the fixed probe set), ``view``
    (``["sgd", "sam"]``: at ``w`` and at ``w + ε_i``), ``layer`` (watched layers, by module name),
    ``module`` (modules owning parameters, for ``weight_norm``).
coords
    ``step`` (int, number of optimizer steps taken), ``epoch(step)`` (float, epochs done: exact
    at epoch ends, fractional for step-scheduled records), ``example`` (stable integer ids from
    the data set), ``is_noisy(example)``, ``label(example)`` (observed), ``true_label(example)``,
    ``view``, ``layer``, ``module``.
data variables
    Per example, from :class:`~sam_diagnostics.Probe` with a leading ``step``: ``loss``,
    ``margin``, ``logit_scale``, ``jacobian_norm``, ``grad_norm`` over (step, view, example);
    ``activation_norm`` over (step, view, example, layer); ``last_layer_weight_norm(step)``;
    ``weight_norm(step, module)``. Training curves over ``step`` (measured in eval mode, under
    ``torch.no_grad``, on whole splits): ``train_loss`` and ``train_accuracy`` (noisy training
    set, observed labels), ``clean_train_accuracy``, ``noisy_train_accuracy`` (against the
    *observed* labels: memorization), ``test_loss``, ``test_accuracy``, ``val_accuracy`` (if a
    validation set is given) and ``batch_loss`` (mean of the optimizer's minibatch losses since
    the previous record; NaN for the record before the first step).
attrs
    The run configuration (scalars and strings only), ``sam_diagnostics_version``, the probe's
    settings (``probe_rho``, ``probe_m`` with 0 = whole probe batch, ``probe_examples``, ``head``,
    ``probe_method``) and ``complete`` (1 once the run finished, 0 while running or if killed).

Storage
-------
:class:`RunStore` appends along ``step`` to a zarr (format 2) store, buffering a few recorded
steps per append (``flush_every`` records, or sooner once ``flush_seconds`` have passed since the
last write) and flushing at :meth:`RunStore.close` and at interpreter exit. Every append writes
its chunks (atomically, file by file) before the store's consolidated metadata, which is
rewritten last: a run killed at any moment therefore reopens with exactly its flushed steps.
:func:`open_run` reads zarr or netCDF only; nothing in a file is ever executed or unpickled.

Distributed runs (a later issue): chunks hold all examples by default (``example_chunk``);
giving each rank a disjoint, chunk-aligned share of the probe set keeps one writer per chunk.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401 - its exit hook must precede ours
import functools
import json
import math
import shutil
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import Tensor, nn

from . import __version__
from .data import NoisyDataset, probe_subset
from .hooks import measuring
from .jacobian import model_logits
from .logit_terms import is_binary, per_example_loss
from .probe import Probe

__all__ = [
    "CONFIG_KEYS",
    "CURVES",
    "Recorder",
    "RunStore",
    "find_runs",
    "merge_runs",
    "open_run",
    "summary_table",
    "group_summary",
    "to_netcdf",
]

#: Configuration attributes promoted to ``run`` coordinates by :func:`merge_runs`.
CONFIG_KEYS: tuple[str, ...] = (
    "optimizer",
    "rho",
    "m",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "epochs",
    "seed",
    "noise_rate",
    "noise_mode",
    "dataset",
    "model",
    "gamma_act",
    "gamma_weight",
    "complete",
)

#: Training-curve variables (over ``step`` only).
CURVES: tuple[str, ...] = (
    "train_loss",
    "train_accuracy",
    "clean_train_accuracy",
    "noisy_train_accuracy",
    "test_loss",
    "test_accuracy",
    "val_accuracy",
    "batch_loss",
)

#: Per-example coordinates; :func:`merge_runs` gives them a ``run`` dimension.
_EXAMPLE_COORDS = ("is_noisy", "label", "true_label")
_ZARR_MARKERS = (".zgroup", "zarr.json", ".zattrs")
_NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".h5", ".hdf5", ".cdf")


# --------------------------------------------------------------------------------------------
# Attributes
# --------------------------------------------------------------------------------------------


def _clean_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes as netCDF/zarr-safe scalars: bool -> int, None dropped, sequences -> JSON."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if value is None:
            continue
        if isinstance(value, (bool, np.bool_)):
            value = int(value)
        elif isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, PathLike):
            value = str(value)
        elif isinstance(value, (list, tuple, dict)):
            value = json.dumps(value)
        if not isinstance(value, (int, float, str)):
            raise TypeError(
                f"attribute {key!r} must be a scalar or a string, got {type(value).__name__}"
            )
        out[str(key)] = value
    return out


# --------------------------------------------------------------------------------------------
# Zarr store
# --------------------------------------------------------------------------------------------


def _is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in _ZARR_MARKERS)


def _remove_store(path: Path) -> None:
    """Delete an existing run (a zarr store, a netCDF file or an empty folder) — nothing else."""
    if not path.exists():
        return
    if path.is_dir():
        if _is_zarr_dir(path) or not any(path.iterdir()):
            shutil.rmtree(path)
            return
        raise FileExistsError(
            f"refusing to overwrite {str(path)!r}: it is a folder that is not a zarr store"
        )
    if path.suffix in _NETCDF_SUFFIXES:
        path.unlink()
        return
    raise FileExistsError(f"refusing to overwrite {str(path)!r}: it is not a run store")


def _flush_at_exit(ref: weakref.ref) -> None:
    store = ref()
    if store is not None and not store._closed:
        try:
            store.flush()
        except Exception as err:  # never turn an exit into a traceback
            warnings.warn(f"could not flush {store.path}: {err}", RuntimeWarning, stacklevel=1)


def _register_exit_flush(callback) -> None:
    """Run ``callback`` when the interpreter exits, while thread pools still work.

    zarr writes through thread pools, and ``concurrent.futures`` refuses new work once the
    interpreter shuts down, before plain ``atexit`` handlers run; ``threading``'s own exit hooks
    run earlier (last registered first), so the flush goes there when available.
    """
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(callback)
            return
        except RuntimeError:  # already shutting down
            pass
    atexit.register(callback)


class RunStore:
    """An append-only zarr store of one run, written step by step.

    Parameters
    ----------
    path : path
        The zarr folder to create (``*.zarr`` by convention).
    attrs : mapping, optional
        Run attributes (scalars/strings); written with the first flush.
    overwrite : bool
        Replace an existing run at ``path`` (only a zarr store, a netCDF file or an empty
        folder is ever deleted). Without it an existing ``path`` raises ``FileExistsError``.
    flush_every : int
        Recorded steps buffered per append (1 = write every record at once).
    flush_seconds : float
        Also write as soon as a record arrives this long after the previous write.
    chunk_steps : int
        Chunk length along ``step`` (> 1 keeps the file count low).
    example_chunk : int, optional
        Chunk length along ``example`` (default: the whole probe set).

    Notes
    -----
    Appends rewrite the consolidated metadata last, so a process killed mid-append leaves the
    previous, complete steps readable by :func:`open_run`. Buffered records are flushed by
    :meth:`flush`, :meth:`close` and at interpreter exit (not on ``SIGKILL``).
    """

    def __init__(self, path: str | PathLike, *, attrs: Mapping[str, Any] | None = None,
                 overwrite: bool = False, flush_every: int = 16, flush_seconds: float = 30.0,
                 chunk_steps: int = 16, example_chunk: int | None = None):
        if int(flush_every) != flush_every or flush_every < 1:
            raise ValueError(f"flush_every must be a positive integer, got {flush_every!r}")
        if int(chunk_steps) != chunk_steps or chunk_steps < 1:
            raise ValueError(f"chunk_steps must be a positive integer, got {chunk_steps!r}")
        if not flush_seconds >= 0:
            raise ValueError(f"flush_seconds must be >= 0, got {flush_seconds!r}")
        self.path = Path(path).expanduser()
        if self.path.exists():
            if not overwrite:
                raise FileExistsError(
                    f"{str(self.path)!r} already exists; choose another path or overwrite it"
                )
            _remove_store(self.path)
        self.attrs = _clean_attrs({**(attrs or {}), "complete": 0})
        self.flush_every = int(flush_every)
        self.flush_seconds = float(flush_seconds)
        self.chunk_steps = int(chunk_steps)
        self.example_chunk = example_chunk
        self._buffer: list[xr.Dataset] = []
        self._written = 0
        self._created = False
        self._closed = False
        self._last_write = time.monotonic()
        _register_exit_flush(functools.partial(_flush_at_exit, weakref.ref(self)))

    @property
    def steps_written(self) -> int:
        """Recorded steps already in the store (not counting the buffer)."""
        return self._written

    def __len__(self) -> int:
        return self._written + sum(ds.sizes["step"] for ds in self._buffer)

    def __repr__(self) -> str:
        buffered = len(self) - self._written
        return f"RunStore({str(self.path)!r}, written={self._written}, buffered={buffered})"

    def append(self, ds: xr.Dataset) -> None:
        """Buffer one or more recorded steps (a dataset with a ``step`` dimension)."""
        if self._closed:
            raise ValueError(f"the store {str(self.path)!r} is closed")
        if "step" not in ds.dims:
            raise ValueError("append needs a dataset with a 'step' dimension")
        self._buffer.append(ds)
        buffered = len(self) - self._written
        if (buffered >= self.flush_every
                or time.monotonic() - self._last_write >= self.flush_seconds):
            self.flush()

    def _encoding(self, ds: xr.Dataset) -> dict[str, dict]:
        encoding = {}
        for name, var in ds.variables.items():
            if "step" not in var.dims:
                continue
            chunks = tuple(
                self.chunk_steps if d == "step"
                else min(self.example_chunk, n) if d == "example" and self.example_chunk
                else n
                for d, n in zip(var.dims, var.shape)
            )
            encoding[name] = {"chunks": chunks}
        return encoding

    def flush(self) -> None:
        """Write the buffered steps (one zarr append)."""
        if not self._buffer:
            return
        if len(self._buffer) == 1:
            ds = self._buffer[0]
        else:
            ds = xr.concat(self._buffer, dim="step", data_vars="minimal", coords="minimal",
                           compat="override", join="exact", combine_attrs="override")
        ds = ds.copy()
        ds.attrs = dict(self.attrs)
        if not self._created:
            for var in ds.variables.values():
                var.encoding = {}
            ds.to_zarr(self.path, mode="w-", encoding=self._encoding(ds), consolidated=True,
                       zarr_format=2)
            self._created = True
        else:
            ds = ds.drop_vars([n for n, v in ds.variables.items() if "step" not in v.dims])
            for var in ds.variables.values():
                var.encoding = {}
            ds.to_zarr(self.path, append_dim="step", consolidated=True, zarr_format=2)
        self._written += ds.sizes["step"]
        self._buffer.clear()
        self._last_write = time.monotonic()

    def update_attrs(self, **attrs: Any) -> None:
        """Set run attributes (flushes first so they land in the store)."""
        self.attrs.update(_clean_attrs(attrs))
        self.flush()
        if self._created:
            import zarr

            group = zarr.open_group(str(self.path), mode="r+", zarr_format=2)
            group.attrs.update(self.attrs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                zarr.consolidate_metadata(str(self.path), zarr_format=2)

    def close(self, complete: bool | None = None) -> None:
        """Flush; with ``complete`` set, also record it (``complete=1`` marks a finished run)."""
        if self._closed:
            return
        try:
            if complete is not None:
                self.update_attrs(complete=int(bool(complete)))
            else:
                self.flush()
        finally:
            self._closed = True


# --------------------------------------------------------------------------------------------
# Recorder
# --------------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _predictions(logits: Tensor) -> Tensor:
    if is_binary(logits):
        return (logits.reshape(-1) > 0).long()
    return logits.argmax(dim=1)


def _nan_like(ds: xr.Dataset) -> xr.Dataset:
    out = ds.copy(deep=True)
    for name, var in out.data_vars.items():
        if np.issubdtype(var.dtype, np.floating):
            out[name] = var.copy(data=np.full(var.shape, np.nan, dtype=var.dtype))
    return out


class Recorder:
    """Instrument a training loop: probe diagnostics and training curves on a schedule.

    Parameters
    ----------
    model : nn.Module
        The model being trained. It is measured in eval mode and left exactly as it was.
    out : path, RunStore or None
        Where to stream the run (a new zarr store), or ``None`` to keep it in memory only.
    probe : NoisyDataset or int
        The fixed probe set, or its size: a subset of ``train`` stratified over
        (true label, is_noisy) by :func:`~sam_diagnostics.data.probe_subset`.
    train, test, val : NoisyDataset, optional
        Splits for the training curves (``train`` with observed, possibly noisy labels).
    config : mapping, optional
        The run's configuration, stored as attributes (scalars/strings). Its ``rho`` and ``m``
        (0 = whole batch) are the probe's defaults.
    every_epochs : int or None
        Record at the end of every k-th epoch (``None``/0: never by epoch).
    every_steps : int or None
        Record every k optimizer steps (``None``/0: never by step).
    steps_per_epoch : int, optional
        Lets :meth:`step` detect epoch ends by itself (else call :meth:`epoch_end`) and gives
        step-scheduled records a fractional ``epoch``.
    rho, m : optional
        Radius and group size of the probe's SAM view (default: ``config``'s, else 0.05 and 1;
        ``m = 0`` = one ε for the whole probe batch).
    probe_options : mapping, optional
        Extra :class:`~sam_diagnostics.Probe` arguments (``layers``, ``head``, ``method``,
        ``per_block``, ``loss_fn``, ``output_fn``).
    probe_seed : int
        Seed of the stratified probe draw when ``probe`` is a size.
    probe_batch_size : int, optional
        Measure the probe set in slices of this many examples (multiple of ``m``) to bound memory.
    eval_batch_size : int
        Batch size of the accuracy/loss evaluation.
    record_initial : bool
        Record the model as it is now (step 0) on construction.
    overwrite, flush_every, flush_seconds, chunk_steps :
        Passed to :class:`RunStore` when ``out`` is a path.
    keep : bool, optional
        Keep every record in memory (default: only when ``out`` is ``None``).

    Examples
    --------
    A plain loop needs three added lines (marked)::

        loader = DataLoader(splits.train, batch_size=128, shuffle=True)
        rec = Recorder(model, "run.zarr", probe=256, train=splits.train,  # added
                       test=splits.test, steps_per_epoch=len(loader))
        for epoch in range(epochs):
            for x, y, _ in loader:
                loss = opt.step(x, y)
                rec.step(loss)                                             # added
        rec.close()                                                        # added
        ds = open_run("run.zarr")

    ``with Recorder(...) as rec:`` closes it too, marking the run incomplete on an exception.
    """

    def __init__(
        self,
        model: nn.Module,
        out: str | PathLike | RunStore | None,
        probe: NoisyDataset | int = 256,
        *,
        train: NoisyDataset | None = None,
        test: NoisyDataset | None = None,
        val: NoisyDataset | None = None,
        config: Mapping[str, Any] | None = None,
        every_epochs: int | None = 1,
        every_steps: int | None = None,
        steps_per_epoch: int | None = None,
        rho: float | None = None,
        m: int | None = None,
        probe_options: Mapping[str, Any] | None = None,
        probe_seed: int = 0,
        probe_batch_size: int | None = None,
        eval_batch_size: int = 1024,
        record_initial: bool = True,
        overwrite: bool = False,
        flush_every: int = 16,
        flush_seconds: float = 30.0,
        chunk_steps: int = 16,
        keep: bool | None = None,
    ):
        config = dict(config or {})
        for name, value in (("every_epochs", every_epochs), ("every_steps", every_steps),
                            ("steps_per_epoch", steps_per_epoch),
                            ("probe_batch_size", probe_batch_size)):
            if value is not None and (isinstance(value, bool) or int(value) != value
                                      or value < 0):
                raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")
        if int(eval_batch_size) != eval_batch_size or eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be a positive integer, got {eval_batch_size!r}")
        if isinstance(probe, (int, np.integer)) and not isinstance(probe, bool):
            if train is None:
                raise ValueError("probe given as a size needs train=... to draw it from")
            probe = train.subset(probe_subset(train, min(int(probe), len(train)),
                                              seed=probe_seed))
        if not isinstance(probe, NoisyDataset) or len(probe) == 0:
            raise ValueError("probe must be a non-empty NoisyDataset or a positive size")

        self.model = model
        self.probe_set = probe
        self.train, self.test = train, test
        self.val = val if val is not None and len(val) else None
        self.every_epochs = int(every_epochs or 0)
        self.every_steps = int(every_steps or 0)
        self.steps_per_epoch = int(steps_per_epoch) if steps_per_epoch else None
        self.rho = float(config.get("rho", 0.05) if rho is None else rho)
        if m is None:
            m = config.get("m", 1)
        if isinstance(m, bool) or int(m) != m or m < 0:
            raise ValueError(f"m must be an integer >= 0 (0 = whole probe batch), got {m!r}")
        self.m = None if m == 0 else int(m)
        options = dict(probe_options or {})
        self.output_fn = options.get("output_fn")
        self.loss_fn = options.get("loss_fn") or per_example_loss
        self.probe = Probe(model, **options)
        if probe_batch_size and self.m is not None:
            probe_batch_size = max(self.m, probe_batch_size // self.m * self.m)
        self.probe_batch_size = (int(probe_batch_size)
                                 if probe_batch_size and self.m is not None else None)
        self.eval_batch_size = int(eval_batch_size)

        self.global_step = 0
        self.epochs_done = 0
        self._last_recorded: int | None = None
        self._loss_sum = 0.0
        self._loss_count = 0
        self._loss_pending: list[Tensor] = []
        self._template: xr.Dataset | None = None
        self._device_cache: tuple[torch.device, tuple[Tensor, Tensor]] | None = None
        self.records: list[xr.Dataset] = []
        self.probe_head: str | None = None
        self._closed = False

        self.attrs = _clean_attrs({
            **config,
            "sam_diagnostics_version": __version__,
            "probe_rho": self.rho,
            "probe_m": 0 if self.m is None else self.m,
            "probe_examples": len(probe),
            "probe_method": self.probe.method,
            "record_every_epochs": self.every_epochs,
            "record_every_steps": self.every_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "complete": 0,
        })
        if isinstance(out, RunStore):
            self.store: RunStore | None = out
            out.attrs.update({**self.attrs, **out.attrs, "complete": 0})
        elif out is None:
            self.store = None
        else:
            self.store = RunStore(out, attrs=self.attrs, overwrite=overwrite,
                                  flush_every=flush_every, flush_seconds=flush_seconds,
                                  chunk_steps=chunk_steps)
        self.keep = (self.store is None) if keep is None else bool(keep)
        if record_initial:
            self.record()

    # ---------------------------------------------------------------- schedule
    @property
    def last_recorded_step(self) -> int | None:
        """``step`` of the latest record (``None`` before the first)."""
        return self._last_recorded

    @property
    def epoch(self) -> float:
        """Epochs done so far (fractional between epoch ends when ``steps_per_epoch`` is set)."""
        if self.steps_per_epoch:
            within = self.global_step - self.epochs_done * self.steps_per_epoch
            return self.epochs_done + max(0, within) / self.steps_per_epoch
        return float(self.epochs_done)

    def step(self, loss: Tensor | float | None = None) -> xr.Dataset | None:
        """Count one optimizer step (call it after the step); record if the schedule says so.

        ``loss`` (the step's mean minibatch loss) feeds ``batch_loss``; tensors are kept on
        their device and only read at the next record. Returns the record, if one was made.
        """
        self.global_step += 1
        if loss is not None:
            if isinstance(loss, Tensor):
                self._loss_pending.append(loss.detach().reshape(()))
            else:
                self._loss_sum += float(loss)
                self._loss_count += 1
        record = None
        if self.every_steps and self.global_step % self.every_steps == 0:
            record = self.record()
        if self.steps_per_epoch and self.global_step % self.steps_per_epoch == 0:
            at_epoch_end = self.epoch_end()
            if at_epoch_end is not None:
                record = at_epoch_end
        return record

    def epoch_end(self) -> xr.Dataset | None:
        """Mark the end of an epoch; record if the schedule says so.

        Only needed without ``steps_per_epoch`` (with it, :meth:`step` calls this itself).
        """
        self.epochs_done += 1
        if self.every_epochs and self.epochs_done % self.every_epochs == 0:
            if self._last_recorded != self.global_step:
                return self.record()
        return None

    # ---------------------------------------------------------------- measuring
    def _probe_tensors(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._device_cache is None or self._device_cache[0] != device:
            p = self.probe_set
            self._device_cache = (device, (p.inputs.to(device), p.labels.to(device)))
        return self._device_cache[1]

    def _measure_probe(self) -> xr.Dataset:
        device = _model_device(self.model)
        x, y = self._probe_tensors(device)
        p = self.probe_set
        n = x.shape[0]
        size = self.probe_batch_size or n
        parts = []
        try:
            for start in range(0, n, size):
                s = slice(start, start + size)
                parts.append(self.probe.measure(
                    x[s], y[s], rho=self.rho, m=self.m,
                    example_ids=p.example_ids[s].numpy(), is_noisy=p.is_noisy[s].numpy(),
                    true_labels=p.true_labels[s].numpy()))
        except ValueError as err:
            if self._template is None or "finite" not in str(err):
                raise
            warnings.warn(f"step {self.global_step}: probe not measurable ({err}); "
                          "recording NaN", RuntimeWarning, stacklevel=3)
            return _nan_like(self._template)
        if len(parts) == 1:
            ds = parts[0]
        else:
            ds = xr.concat(parts, dim="example", data_vars="minimal", coords="minimal",
                           compat="override", join="exact", combine_attrs="override")
        self.probe_head = ds.attrs.get("head")
        ds.attrs = {}
        return ds

    def _evaluate(self, data: NoisyDataset) -> tuple[np.ndarray, np.ndarray]:
        """Per-example correctness (vs observed labels) and loss, eval mode, no grad."""
        device = _model_device(self.model)
        correct, losses = [], []
        with measuring(self.model), torch.no_grad():
            for start in range(0, len(data), self.eval_batch_size):
                x = data.inputs[start:start + self.eval_batch_size].to(device, non_blocking=True)
                y = data.labels[start:start + self.eval_batch_size].to(device, non_blocking=True)
                logits = model_logits(self.model, x, self.output_fn)
                finite = torch.isfinite(logits.reshape(logits.shape[0], -1)).all(dim=1)
                correct.append((_predictions(logits) == y) & finite)  # diverged = wrong
                loss_fn = getattr(self.loss_fn, "unchecked", self.loss_fn)
                losses.append(loss_fn(logits, y).float())
        if not correct:
            return np.zeros(0, bool), np.zeros(0)
        return (torch.cat(correct).cpu().numpy(),
                torch.cat(losses).to("cpu", torch.float64).numpy())

    def _curves(self) -> dict[str, float]:
        def mean(a: np.ndarray) -> float:
            return float(a.mean()) if a.size else math.nan

        curves = dict.fromkeys(CURVES, math.nan)
        if self.train is not None:
            correct, loss = self._evaluate(self.train)
            noisy = self.train.is_noisy.numpy()
            curves.update(train_loss=mean(loss), train_accuracy=mean(correct),
                          clean_train_accuracy=mean(correct[~noisy]),
                          noisy_train_accuracy=mean(correct[noisy]))
        if self.test is not None:
            correct, loss = self._evaluate(self.test)
            curves.update(test_loss=mean(loss), test_accuracy=mean(correct))
        if self.val is not None:
            curves["val_accuracy"] = mean(self._evaluate(self.val)[0])
        if self._loss_pending:
            self._loss_sum += float(torch.stack(self._loss_pending).double().sum())
            self._loss_count += len(self._loss_pending)
            self._loss_pending.clear()
        if self._loss_count:
            curves["batch_loss"] = self._loss_sum / self._loss_count
        self._loss_sum, self._loss_count = 0.0, 0
        drop = {"val_accuracy"} if self.val is None else set()
        if self.test is None:
            drop |= {"test_loss", "test_accuracy"}
        if self.train is None:
            drop |= {"train_loss", "train_accuracy", "clean_train_accuracy",
                     "noisy_train_accuracy"}
        return {k: v for k, v in curves.items() if k not in drop}

    def record(self) -> xr.Dataset:
        """Measure now (probe set in both views, training curves) and store one step."""
        if self._closed:
            raise ValueError("the recorder is closed")
        probe = self._measure_probe()
        if self._template is None:
            self._template = probe
        curves = self._curves()
        ds = probe.expand_dims(step=[self.global_step])
        ds = ds.assign_coords(epoch=("step", [self.epoch]))
        for name, value in curves.items():
            ds[name] = ("step", np.array([value], dtype=np.float64))
        if self.probe_head:
            self.attrs["head"] = self.probe_head
        ds.attrs = dict(self.attrs)
        if self.store is not None:
            if "head" in self.attrs:
                self.store.attrs.setdefault("head", self.attrs["head"])
            self.store.append(ds)
        if self.keep:
            self.records.append(ds)
        self._last_recorded = self.global_step
        return ds

    # ---------------------------------------------------------------- results
    def dataset(self) -> xr.Dataset:
        """The run so far: read back from the store (after a flush), else from memory."""
        if self.store is not None and not self.keep:
            self.store.flush()
            return open_run(self.store.path)
        if not self.records:
            raise ValueError("nothing recorded yet")
        ds = xr.concat(self.records, dim="step", data_vars="minimal", coords="minimal",
                       compat="override", join="exact", combine_attrs="override")
        ds.attrs = dict(self.attrs)
        if self.store is not None:
            ds.attrs = dict(self.store.attrs)
        return ds

    def flush(self) -> None:
        if self.store is not None:
            self.store.flush()

    def close(self, complete: bool = True) -> None:
        """Flush the store and mark the run ``complete`` (or not)."""
        if self._closed:
            return
        self.attrs["complete"] = int(bool(complete))
        if self.store is not None:
            self.store.close(complete=complete)
        self._closed = True

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)


# --------------------------------------------------------------------------------------------
# Reading, merging, exporting
# --------------------------------------------------------------------------------------------


def _netcdf_engine() -> str:
    import importlib.util

    if importlib.util.find_spec("netCDF4") is not None:
        return "netcdf4"
    if importlib.util.find_spec("h5netcdf") is not None and importlib.util.find_spec("h5py"):
        return "h5netcdf"
    raise ImportError("netCDF I/O needs the netCDF4 package (pip install netCDF4)")


def _zarr_attrs(path: Path) -> dict:
    for name in (".zattrs", "zarr.json"):
        f = path / name
        if f.is_file():
            try:
                meta = json.loads(f.read_text())
            except (OSError, ValueError):
                return {}
            return meta.get("attributes", meta) if name == "zarr.json" else meta
    return {}


def _has_consolidated(path: Path) -> bool:
    if (path / ".zmetadata").is_file():
        return True
    f = path / "zarr.json"
    if f.is_file():
        try:
            return json.loads(f.read_text()).get("consolidated_metadata") is not None
        except (OSError, ValueError):
            return False
    return False


def open_run(path: str | PathLike, *, load: bool = True) -> xr.Dataset:
    """Open one stored run (a zarr store or a netCDF file).

    Only zarr and netCDF readers are used: nothing in the file is executed or unpickled.
    A run killed while writing reopens with every step flushed before the kill.

    Parameters
    ----------
    path : path
        A zarr folder or a netCDF file.
    load : bool
        Read everything into memory and close the file (default); ``False`` keeps it lazy.

    Raises
    ------
    FileNotFoundError
        No run at ``path``.
    ValueError
        A run store that never finished its first write.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no run at {str(p)!r}")
    if p.is_file():
        ds = xr.open_dataset(p, engine=_netcdf_engine(), decode_times=False)
    else:
        if not _is_zarr_dir(p):
            raise FileNotFoundError(f"{str(p)!r} is a folder but not a zarr store")
        if _has_consolidated(p):
            ds = xr.open_zarr(p, consolidated=True, chunks=None, decode_times=False)
        elif "sam_diagnostics_version" in _zarr_attrs(p):
            raise ValueError(
                f"{str(p)!r} holds no finished step: the run stopped before its first write "
                "completed")
        else:  # a store written by another tool without consolidated metadata
            ds = xr.open_zarr(p, consolidated=False, chunks=None, decode_times=False)
    if load:
        ds = ds.load()
        ds.close()
    return ds


def find_runs(path: str | PathLike) -> list[Path]:
    """The runs at ``path``: itself if it is a run, else the zarr stores and netCDF files in it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no run or folder at {str(p)!r}")
    if p.is_file() or _is_zarr_dir(p):
        return [p]
    runs = sorted(c for c in p.iterdir()
                  if _is_zarr_dir(c) or c.is_file() and c.suffix in _NETCDF_SUFFIXES)
    if not runs:
        raise FileNotFoundError(f"no runs (zarr stores or netCDF files) in {str(p)!r}")
    return runs


def _run_name(path: Path) -> str:
    name = path.name
    for suffix in (".zarr", *_NETCDF_SUFFIXES):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def merge_runs(
    runs: str | PathLike | Iterable[str | PathLike | xr.Dataset],
    *,
    names: Sequence[str] | None = None,
) -> xr.Dataset:
    """Concatenate runs along a new ``run`` dimension, configuration as ``run`` coordinates.

    Parameters
    ----------
    runs : path or iterable of paths / datasets
        Stored runs (a folder means every run in it, see :func:`find_runs`) or datasets.
    names : sequence of str, optional
        Values of the ``run`` coordinate (default: the store names without suffix, or
        ``run0, run1, ...`` for datasets).

    Returns
    -------
    xarray.Dataset
        dims ``run`` plus those of a run; ``step`` is the outer join of the runs' steps (NaN
        where a run has no record). ``example`` becomes the position in each run's probe set
        (runs with other seeds have other probe examples): the stable ids are in
        ``example_id(run, example)``, with ``is_noisy``, ``label``, ``true_label`` also over
        (run, example) (padding: id/labels -1, ``is_noisy`` False, data NaN) and ``epoch`` over
        (run, step). The configuration (:data:`CONFIG_KEYS`: ``optimizer``, ``rho``, ``m``,
        ``seed``, ``dataset``, ``model``, ``noise_rate``, ...) becomes ``run`` coordinates;
        attrs keep what all runs share.
    """
    if isinstance(runs, (str, PathLike)):
        runs = find_runs(runs)
    items = list(runs)
    if not items:
        raise ValueError("merge_runs needs at least one run")
    datasets, default_names = [], []
    for i, item in enumerate(items):
        if isinstance(item, xr.Dataset):
            datasets.append(item)
            default_names.append(f"run{i}")
        else:
            datasets.append(open_run(item))
            default_names.append(_run_name(Path(item)))
    if names is None:
        seen: dict[str, int] = {}
        names = []
        for name in default_names:
            count = seen.get(name, 0)
            seen[name] = count + 1
            names.append(name if count == 0 else f"{name}-{count}")
    names = [str(n) for n in names]
    if len(names) != len(datasets) or len(set(names)) != len(names):
        raise ValueError("names must be unique, one per run")

    keys = [k for k in CONFIG_KEYS if any(k in ds.attrs for ds in datasets)]
    textual = {k for k in keys if any(isinstance(ds.attrs.get(k), str) for ds in datasets)}
    prepared = []
    for ds in datasets:
        if "run" in ds.dims:
            raise ValueError("merge_runs takes single runs; this dataset already has 'run'")
        ds = ds.copy()
        ds.attrs = {}
        if "example" in ds.dims:
            ids = ds["example"].values if "example" in ds.coords else np.arange(
                ds.sizes["example"])
            ds = ds.drop_vars("example", errors="ignore").assign_coords(
                example=np.arange(ds.sizes["example"]), example_id=("example", ids))
        for name in ("example_id", *_EXAMPLE_COORDS, "epoch"):
            if name in ds.coords:
                ds = ds.assign_coords({name: ds[name].variable.set_dims(
                    ("run", *ds[name].dims))})
        prepared.append(ds)

    def config_value(ds: xr.Dataset, key: str):
        value = ds.attrs.get(key)
        if value is None:
            return "" if key in textual else np.nan
        return str(value) if key in textual else value

    fill = {"example_id": -1, "label": -1, "true_label": -1, "is_noisy": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        merged = xr.concat(prepared, dim="run", data_vars="all",
                           coords="different", compat="equals", join="outer",
                           fill_value=fill | {v: np.nan for p in prepared for v in p.data_vars},
                           combine_attrs="drop_conflicts")
    merged = merged.assign_coords(run=("run", np.asarray(names, dtype=str)))
    merged = merged.assign_coords(
        {k: ("run", np.asarray([config_value(ds, k) for ds in datasets])) for k in keys})
    common = {}
    first = datasets[0].attrs
    for key, value in first.items():
        if key in keys:
            continue
        if all(key in ds.attrs and _same(ds.attrs[key], value) for ds in datasets[1:]):
            common[key] = value
    merged.attrs = common
    return merged


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) or (isinstance(a, float) and isinstance(b, float)
                                and math.isnan(a) and math.isnan(b))
    except Exception:
        return False


def to_netcdf(ds: xr.Dataset | str | PathLike, path: str | PathLike, *,
              engine: str | None = None, overwrite: bool = False) -> Path:
    """Export a run (or merged runs) to one netCDF-4 file that :func:`open_run` reopens equal.

    Parameters
    ----------
    ds : xarray.Dataset or path
        The data, or a stored run to convert.
    path : path
        The ``.nc`` file to write.
    engine : {"netcdf4", "h5netcdf"}, optional
        Default: netCDF4 if installed.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    pathlib.Path
    """
    if not isinstance(ds, xr.Dataset):
        ds = open_run(ds)
    out = Path(path).expanduser()
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{str(out)!r} already exists")
        if out.is_dir():
            raise FileExistsError(f"{str(out)!r} is a folder")
        out.unlink()
    ds = ds.copy()
    ds.attrs = _clean_attrs(ds.attrs)
    for var in ds.variables.values():
        var.encoding = {}
        var.attrs = _clean_attrs(var.attrs)
    ds.to_netcdf(out, engine=engine or _netcdf_engine(), format="NETCDF4")
    return out


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------

#: Columns of :func:`summary_table` that identify a configuration (grouping keys).
GROUP_KEYS: tuple[str, ...] = ("dataset", "model", "noise_rate", "optimizer", "m", "rho")


def _curve(ds: xr.Dataset, name: str) -> np.ndarray:
    if name not in ds.data_vars:
        return np.full(ds.sizes.get("step", 0), np.nan)
    return np.asarray(ds[name].values, dtype=float)


def _summarize_one(ds: xr.Dataset) -> dict[str, Any]:
    attrs = ds.attrs
    row: dict[str, Any] = {k: attrs.get(k) for k in (*GROUP_KEYS, "seed")}
    epoch = (np.asarray(ds["epoch"].values, dtype=float) if "epoch" in ds.coords
             else np.asarray(ds["step"].values, dtype=float))
    test = _curve(ds, "test_accuracy")
    valid = ~np.isnan(test)
    row["epochs_recorded"] = float(np.nanmax(epoch)) if epoch.size and not np.isnan(
        epoch).all() else math.nan
    row["complete"] = bool(attrs.get("complete", 0))
    if valid.any():
        best = int(np.nanargmax(test))
        row["best_test_acc"] = test[best]
        row["best_epoch"] = epoch[best]
        row["final_test_acc"] = test[np.flatnonzero(valid)[-1]]
        row["clean_train_acc_at_best"] = _curve(ds, "clean_train_accuracy")[best]
        row["noisy_train_acc_at_best"] = _curve(ds, "noisy_train_accuracy")[best]
    else:
        for k in ("best_test_acc", "best_epoch", "final_test_acc", "clean_train_acc_at_best",
                  "noisy_train_acc_at_best"):
            row[k] = math.nan
    val = _curve(ds, "val_accuracy")
    if (~np.isnan(val)).any():
        row["best_val_acc"] = float(np.nanmax(val))
        row["test_acc_at_best_val"] = test[int(np.nanargmax(val))]
    return row


def summary_table(runs: xr.Dataset | str | PathLike | Iterable[str | PathLike]) -> pd.DataFrame:
    """One row per run: best test accuracy and its epoch, final test accuracy, clean/noisy
    training accuracy at the best epoch (and test accuracy at the best validation accuracy,
    when recorded), with the run's configuration.

    ``runs`` is a run, merged runs (with a ``run`` dimension), a path (a run or a folder of
    runs) or a list of paths. Accuracies are fractions in [0, 1].
    """
    rows = []
    if isinstance(runs, xr.Dataset):
        if "run" in runs.dims:
            for name in runs["run"].values:
                one = runs.sel(run=name)
                one.attrs = {**runs.attrs, **{k: one[k].item() for k in CONFIG_KEYS
                                              if k in one.coords}}
                rows.append({"run": str(name), **_summarize_one(one)})
        else:
            rows.append({"run": "run", **_summarize_one(runs)})
    else:
        paths = find_runs(runs) if isinstance(runs, (str, PathLike)) else [Path(r) for r in runs]
        for p in paths:
            ds = open_run(p, load=False)
            present = [c for c in CURVES if c in ds.data_vars]
            small = ds[present].load()  # the curves only: per-example data stay on disk
            small.attrs = dict(ds.attrs)
            ds.close()
            if "run" in small.dims:  # a file of merged runs
                rows.extend(summary_table(small).to_dict("records"))
            else:
                rows.append({"run": _run_name(p), **_summarize_one(small)})
    return pd.DataFrame(rows)


def group_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of each configuration of :func:`summary_table`.

    Grouped by (dataset, model, noise_rate, optimizer, m, rho); columns ``n_seeds`` and
    ``<metric>_mean`` / ``<metric>_std`` (std with ``ddof=1``, NaN for one seed).
    """
    metrics = [c for c in ("best_test_acc", "best_epoch", "final_test_acc",
                           "clean_train_acc_at_best", "noisy_train_acc_at_best",
                           "best_val_acc", "test_acc_at_best_val") if c in table]
    keys = [k for k in GROUP_KEYS if k in table]
    if table.empty:
        return pd.DataFrame(columns=[*keys, "n_seeds"])
    filled = table.copy()
    for k in keys:
        filled[k] = filled[k].astype(object).where(filled[k].notna(), "-")
    grouped = filled.groupby(keys, sort=False, dropna=False)
    out = grouped[metrics].agg(["mean", "std"])
    out.columns = [f"{a}_{b}" for a, b in out.columns]
    out.insert(0, "n_seeds", grouped.size())
    return out.reset_index()

"""`Recorder`: probe diagnostics and training curves of a training loop, on a schedule.

The stored schema is :mod:`sam_diagnostics.schema` (``docs/schema.md``); the zarr writer is
:class:`~sam_diagnostics.store.RunStore`, reading back is :mod:`sam_diagnostics.runs`.
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401 - its exit hook must precede ours
import math
import warnings
from collections.abc import Mapping
from os import PathLike
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from ._version import __version__
from .data import NoisyDataset, as_noisy_dataset, probe_subset
from .errors import NonFiniteError
from .hooks import measuring
from .jacobian import model_logits
from .live import as_sinks, close_sinks, log_record
from .logit_terms import is_binary, per_example_loss
from .probe import Probe
from .runs import open_run
from .schema import CURVES, RUN_ATTRS, describe, m_from_disk, m_to_disk
from .store import RunStore, clean_attrs

__all__ = ["Recorder"]

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


_FROM_CONFIG: Any = object()


def describe_dataset(ds: xr.Dataset) -> xr.Dataset:
    """Give every schema variable and coordinate of ``ds`` its long_name, units, description."""
    for name, attrs in describe(ds.variables).items():
        ds[name].attrs.update(attrs)
    return ds


def _check_count(name: str, value: Any, *, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                              or value < minimum):
        raise ValueError(f"{name} must be an integer >= {minimum} or None, got {value!r}")


def _nan_like(ds: xr.Dataset) -> xr.Dataset:
    out = ds.copy(deep=True)
    for name, var in out.data_vars.items():
        if np.issubdtype(var.dtype, np.floating):
            out[name] = var.copy(data=np.full(var.shape, np.nan, dtype=var.dtype))
    return out


def _dist_world(distributed: bool | None, group: Any) -> tuple[int, int]:
    """``(rank, world size)`` of the process group (``(0, 1)`` when not distributed)."""
    if distributed is False:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise ValueError("distributed=True needs an initialized torch.distributed process "
                             "group (torch.distributed.init_process_group)")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_gather(obj: Any, group: Any, world: int) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def rank0_creates(create, *, group: Any = None, distributed: bool = True):
    """``create()`` on rank 0 only (``None`` on the others); an error on rank 0 is raised on
    every rank, so all of them stop before training (the store's one writer is rank 0).

    Not distributed: just ``create()``.
    """
    rank, world = _dist_world(distributed, group)
    if world == 1:
        return create()
    result, error, message = None, None, None
    if rank == 0:
        try:
            result = create()
        except BaseException as err:  # re-raised below, after the others know
            error, message = err, f"{type(err).__name__}: {err}"
    message = _all_gather(message, group, world)[0]
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 could not create the run store: {message}")
    return result


def _shard(n: int, rank: int, world: int, unit: int | None) -> slice:
    """This rank's contiguous share of ``n`` items in whole units of ``unit`` (None: all on
    rank 0)."""
    if world == 1:
        return slice(0, n)
    if unit is None:
        return slice(0, n) if rank == 0 else slice(0, 0)
    groups = -(-n // unit)
    return slice(min(n, rank * groups // world * unit), min(n, (rank + 1) * groups // world * unit))


class Recorder:
    """Instrument a training loop: probe diagnostics and training curves on a schedule.

    Parameters
    ----------
    model : nn.Module
        The model being trained. It is measured in eval mode and left exactly as it was.
    out : path, RunStore or None
        Where to stream the run, or ``None`` to keep it in memory only. A path is created as a
        new zarr store at once (before anything is measured), so a path that exists, that
        another process writes or that cannot be written fails here, not after training.
    probe : dataset or int
        The fixed probe set, or its size: a subset of ``train`` stratified over
        (true label, is_noisy) by :func:`~sam_diagnostics.data.probe_subset` (over the observed
        labels when the true ones are unknown).
    train, test, val : dataset, optional
        Splits for the training curves (``train`` with observed, possibly noisy labels). Any
        map-style data set of ``(x, y)`` or ``(x, y, id)`` items (e.g. ``TensorDataset``) or a
        :class:`~sam_diagnostics.data.NoisyDataset`; items are read once into memory (see
        :func:`~sam_diagnostics.data.as_noisy_dataset`). Without ids, an example's id is its
        position in the data set.
    noise_mask, true_labels : array, optional
        Which ``train`` labels are noisy and the clean labels (also taken from ``is_noisy`` /
        ``true_labels`` attributes of ``train``). Absent: the stored ``is_noisy`` is all
        ``False``, ``true_label`` is -1 (unknown), and ``clean_train_accuracy`` and
        ``noisy_train_accuracy`` are not recorded.
    config : mapping, optional
        The run's configuration, stored as attributes (scalars/strings). Its ``rho`` and ``m``
        (on-disk form: 0 = whole batch) are the probe's defaults.
    every_epochs : int or None
        Record at the end of every k-th epoch (``None``/0: never by epoch).
    every_steps : int or None
        Record every k optimizer steps (``None``/0: never by step).
    steps_per_epoch : int, optional
        Lets :meth:`step` detect epoch ends by itself (else call :meth:`epoch_end`) and gives
        step-scheduled records a fractional ``epoch``.
    rho, m : optional
        Radius and group size of the probe's SAM view (default: ``config``'s, else 0.05 and 1;
        ``m = None`` = one ε for the whole probe batch).
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
        Passed to :class:`~sam_diagnostics.store.RunStore` when ``out`` is a path.
    keep : bool, optional
        Keep every record in memory (default: only when ``out`` is ``None``).
    distributed : bool
        Record a ``torchrun`` / DistributedDataParallel job from every rank together (needs an
        initialized ``torch.distributed`` process group). Off by default, so that a Recorder
        made in one rank only (as the Lightning and transformers integrations do) never waits
        for the others. With it, construct the Recorder on every rank with the same arguments
        and the unwrapped (or wrapped) model, and call it on every rank. Each rank measures
        its contiguous share of the probe set (whole groups of ``m``; with ``m = None``, one ε
        for the whole probe set, rank 0 measures it all) and of the evaluation splits; the
        shares are gathered so that rank 0, the store's only writer, appends one record with
        the global example ids, equal to what one process measures (no ``rank`` dimension).
        ``out`` is created by rank 0 only; the other ranks keep nothing (:meth:`dataset` is
        rank 0's).
    process_group : optional
        The ``torch.distributed`` group (default: the world).
    live : path, callable, sink or list, optional
        Mirror each record's summary scalars (:mod:`sam_diagnostics.live`: clean/noisy logit
        scale and its SAM/SGD ratio, norms, accuracies) to TensorBoard (a log directory) or to
        any callable ``fn(scalars, step)``, while the full per-example data go to the store.

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

    Any map-style data set works; without ids, noise mask or true labels the stored ids are
    positions, ``is_noisy`` is all False and ``true_label`` is -1::

        rec = Recorder(model, "run.zarr", probe=128, train=TensorDataset(x, y),
                       noise_mask=flipped)  # optional: enables clean/noisy accuracies
    """

    def __init__(
        self,
        model: nn.Module,
        out: str | PathLike | RunStore | None,
        probe: Any = 256,
        *,
        train: Any = None,
        test: Any = None,
        val: Any = None,
        noise_mask: Any = None,
        true_labels: Any = None,
        config: Mapping[str, Any] | None = None,
        every_epochs: int | None = 1,
        every_steps: int | None = None,
        steps_per_epoch: int | None = None,
        rho: float | None = None,
        m: int | None = _FROM_CONFIG,
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
        live: Any = None,
        distributed: bool = False,
        process_group: Any = None,
    ):
        # ---- every argument is checked before anything is created or measured
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # measured without gradient synchronisation
        self.rank, self.world = _dist_world(distributed, process_group)
        self.group = process_group
        if out is not None and not isinstance(out, (str, PathLike, RunStore)):
            raise TypeError(f"out must be a path, a RunStore or None, got {type(out).__name__}")
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {type(config).__name__}")
        config = dict(config or {})
        for name, value in (("every_epochs", every_epochs), ("every_steps", every_steps),
                            ("steps_per_epoch", steps_per_epoch),
                            ("probe_batch_size", probe_batch_size)):
            _check_count(name, value, minimum=0)
        _check_count("eval_batch_size", eval_batch_size, minimum=1)
        if train is not None:
            known_mask = (isinstance(train, NoisyDataset) or noise_mask is not None
                          or hasattr(train, "is_noisy"))
            train = as_noisy_dataset(train, is_noisy=noise_mask, true_labels=true_labels,
                                     name="train")
        elif noise_mask is not None or true_labels is not None:
            raise ValueError("noise_mask and true_labels describe train=...; give train too")
        else:
            known_mask = False
        test = None if test is None else as_noisy_dataset(test, name="test")
        val = None if val is None or len(val) == 0 else as_noisy_dataset(val, name="val")
        if isinstance(probe, (int, np.integer)) and not isinstance(probe, bool):
            if probe < 1:
                raise ValueError(f"probe size must be >= 1, got {probe!r}")
            if train is None:
                raise ValueError("probe given as a size needs train=... to draw it from")
            strata: Any = train
            if bool((train.true_labels < 0).any()):  # true labels unknown: stratify observed
                strata = SimpleNamespace(is_noisy=train.is_noisy, true_labels=train.labels)
            probe = train.subset(probe_subset(strata, min(int(probe), len(train)),
                                              seed=probe_seed))
        elif probe is None or isinstance(probe, bool):
            raise TypeError(f"probe must be a data set or a positive size, got {probe!r}")
        else:
            probe = as_noisy_dataset(probe, name="probe")
        self.rho = float(config.get("rho", 0.05) if rho is None else rho)
        if not math.isfinite(self.rho) or self.rho < 0:
            raise ValueError(f"rho must be a finite number >= 0, got {self.rho!r}")
        if m is _FROM_CONFIG:
            m = m_from_disk(config.get("m", 1))
        self.m = None if m is None else m_from_disk(m)
        options = dict(probe_options or {})
        self.output_fn = options.get("output_fn")
        self.loss_fn = options.get("loss_fn") or per_example_loss
        self.probe = Probe(model, **options)

        self.model = model
        self.probe_set = probe
        self.train, self.test, self.val = train, test, val
        self._mask_known = known_mask
        self.every_epochs = int(every_epochs or 0)
        self.every_steps = int(every_steps or 0)
        self.steps_per_epoch = int(steps_per_epoch) if steps_per_epoch else None
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
        self._shares: dict[int, NoisyDataset] = {}  # this rank's share of each split
        self.probe_head: str | None = None
        self._closed = False

        self.attrs = clean_attrs({
            **config,
            **RUN_ATTRS,
            "sam_diagnostics_version": __version__,
            "probe_rho": self.rho,
            "probe_m": m_to_disk(self.m),
            "probe_examples": len(probe),
            "probe_method": self.probe.method,
            "record_every_epochs": self.every_epochs,
            "record_every_steps": self.every_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "complete": 0,
        })
        # ---- the store is created now: a taken or unwritable path fails before any work
        if self.world > 1:
            self.attrs["world_size"] = self.world
        if isinstance(out, RunStore):
            self.store: RunStore | None = out
            out.attrs.update({**self.attrs, **out.attrs, "complete": 0})
        elif out is None:
            self.store = None
        else:
            attrs = self.attrs
            self.store = rank0_creates(
                lambda: RunStore(out, attrs=attrs, overwrite=overwrite, flush_every=flush_every,
                                 flush_seconds=flush_seconds, chunk_steps=chunk_steps),
                group=process_group, distributed=self.world > 1)
        self.attrs = {**self.attrs, **(self.store.attrs if self.store is not None else {})}
        self.keep = (self.store is None and self.rank == 0) if keep is None else bool(keep)
        self.live = as_sinks(live) if self.rank == 0 else []
        if record_initial:
            try:
                self.record()
            except BaseException:
                if self.store is not None:
                    self.store.discard()  # nothing recorded: leave no empty store behind
                raise

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
        share = _shard(x.shape[0], self.rank, self.world, self.m)
        size = self.probe_batch_size or max(1, share.stop - share.start)
        parts: list[Any] = []
        error: str | None = None
        try:
            for start in range(share.start, share.stop, size):
                s = slice(start, min(start + size, share.stop))
                parts.append(self.probe.measure(
                    x[s], y[s], rho=self.rho, m=self.m,
                    example_ids=p.example_ids[s].numpy(), is_noisy=p.is_noisy[s].numpy(),
                    true_labels=p.true_labels[s].numpy()))
        except NonFiniteError as err:
            if self.world == 1 and self._template is None:
                raise
            error = str(err)
        if self.world > 1:  # every rank gets every share (the ranks decide alike)
            gathered = _all_gather((parts, error), self.group, self.world)
            errors = [e for _, e in gathered if e is not None]
            error = errors[0] if errors else None
            parts = [part for ps, _ in gathered for part in ps]
            if error is not None and self._template is None:
                raise NonFiniteError(error)
        if error is not None:
            warnings.warn(f"step {self.global_step}: probe not measurable ({error}); "
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

    def _evaluate_all(self, data: NoisyDataset) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_evaluate` over the whole split, each rank on its contiguous share."""
        if self.world == 1:
            return self._evaluate(data)
        if id(data) not in self._shares:
            share = _shard(len(data), self.rank, self.world, 1)
            self._shares[id(data)] = data.subset(np.arange(share.start, share.stop))
        mine = self._evaluate(self._shares[id(data)])
        gathered = _all_gather(mine, self.group, self.world)
        return (np.concatenate([c for c, _ in gathered]),
                np.concatenate([loss for _, loss in gathered]))

    def _curves(self) -> dict[str, float]:
        def mean(a: np.ndarray) -> float:
            return float(a.mean()) if a.size else math.nan

        curves = dict.fromkeys(CURVES, math.nan)
        if self.train is not None:
            correct, loss = self._evaluate_all(self.train)
            noisy = self.train.is_noisy.numpy()
            curves.update(train_loss=mean(loss), train_accuracy=mean(correct),
                          clean_train_accuracy=mean(correct[~noisy]),
                          noisy_train_accuracy=mean(correct[noisy]))
        if self.test is not None:
            correct, loss = self._evaluate_all(self.test)
            curves.update(test_loss=mean(loss), test_accuracy=mean(correct))
        if self.val is not None:
            curves["val_accuracy"] = mean(self._evaluate_all(self.val)[0])
        if self._loss_pending:
            self._loss_sum += float(torch.stack(self._loss_pending).double().sum())
            self._loss_count += len(self._loss_pending)
            self._loss_pending.clear()
        if self.world > 1:  # equal shards: the global batch's mean is the mean over ranks
            sums = _all_gather((self._loss_sum, self._loss_count), self.group, self.world)
            self._loss_sum = math.fsum(a for a, _ in sums)
            self._loss_count = sum(k for _, k in sums)
        if self._loss_count:
            curves["batch_loss"] = self._loss_sum / self._loss_count
        self._loss_sum, self._loss_count = 0.0, 0
        drop = {"val_accuracy"} if self.val is None else set()
        if self.test is None:
            drop |= {"test_loss", "test_accuracy"}
        if self.train is None:
            drop |= {"train_loss", "train_accuracy", "clean_train_accuracy",
                     "noisy_train_accuracy"}
        elif not self._mask_known:
            drop |= {"clean_train_accuracy", "noisy_train_accuracy"}
        return {k: v for k, v in curves.items() if k not in drop}

    def record(self) -> xr.Dataset:
        """Measure now (probe set in both views, training curves) and store one step."""
        if self._closed:
            raise ValueError("the recorder is closed")
        probe = self._measure_probe()
        if self._template is None:
            self._template = probe
        curves = self._curves()
        ds = probe.expand_dims(step=[self.global_step]).assign_coords(
            epoch=("step", [self.epoch]))
        ds = ds.assign({name: ("step", np.array([value], dtype=np.float64))  # one merge
                        for name, value in curves.items()})
        if self.probe_head:
            self.attrs["head"] = self.probe_head
        describe_dataset(ds)
        ds.attrs = dict(self.attrs)
        if self.store is not None:
            if "head" in self.attrs:
                self.store.attrs.setdefault("head", self.attrs["head"])
            self.store.append(ds)
        if self.keep:
            self.records.append(ds)
        self._last_recorded = self.global_step
        if self.live:
            log_record(ds, self.live)
        return ds

    # ---------------------------------------------------------------- results
    def dataset(self) -> xr.Dataset:
        """The run so far: read back from the store (after a flush), else from memory."""
        if self.store is not None and not self.keep:
            self.store.flush()
            return open_run(self.store.path, warn=False)
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
        close_sinks(self.live)
        self._closed = True

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)



"""One instrumented training run: data, model, optimizer, loop, :class:`Recorder`.

:func:`train` is what ``sam-diagnostics train`` runs; analyses call it directly::

    from sam_diagnostics.train import TrainConfig, train
    ds = train(TrainConfig(dataset="digits", optimizer="sam", epochs=3), "run.zarr")

Reproducibility: the label noise, the train/validation split and the probe set come from
``seed`` through private generators; the model is initialized from ``seed``; the minibatch order
comes from a ``torch.Generator`` seeded with ``seed`` that belongs to the run's DataLoader; and
the loop runs inside ``torch.random.fork_rng`` with ``torch.manual_seed(seed)``, so anything that
does draw from the global generator is seeded too and the caller's RNG state is left untouched.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from .data import NOISE_MODES, dataset_names, load_dataset
from .models import MODELS, build_model
from .record import Recorder, rank0_creates
from .schema import OPTIMIZER_NAMES, m_from_disk
from .store import RunStore

__all__ = ["ConfigError", "OPTIMIZER_NAMES", "TrainConfig", "train", "run_summary_line"]

#: Fields that describe where/how a run executes, not what it computes: not stored as attrs
#: and not compared when a sweep decides whether an existing run is the one asked for.
RUNTIME_FIELDS: tuple[str, ...] = ("data_dir", "device", "sync_epsilon", "amp")

#: Mixed-precision modes of ``amp``: ``"bf16"`` runs the training forward passes under
#: ``torch.autocast`` in bfloat16 (float32's exponent range: no loss scaling needed).
AMP_MODES: tuple[str, ...] = ("off", "bf16")


class ConfigError(ValueError):
    """A run's configuration cannot work (bad value, missing data, existing output)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass
class TrainConfig:
    """Configuration of one run (defaults: the label-noise study's pilot settings).

    Attributes
    ----------
    dataset : {"digits", "mnist1d", "gaussian", "cifar10"}
    model : {"linear", "mlp", "cnn", "resnet18", "two_layer_linear"}
    optimizer : {"sgd", "sam", "lsam", "jsam", "regsgd", "adareg"}
    rho : float
        SAM radius (also the radius of the probe's SAM view, for every optimizer).
    m : int
        Examples per perturbation group; 1 = 1-SAM, 0 = one ε for the whole batch.
    lr, momentum, weight_decay : float
        The base SGD (constant learning rate).
    batch_size, epochs : int
    seed : int
        Seeds the label noise, the split, the probe set, the model and the batch order.
    noise_rate : float
        Label-noise rate in [0, 1).
    noise_mode : {"symmetric", "asymmetric"}
    gamma_act, gamma_weight : float
        Penalties of regularized SGD.
    val_fraction : float
        Fraction of the noisy training pool held out for validation.
    n_samples : int or None
        Size of the training pool (None = the whole source).
    width : int
        Hidden width of the MLPs.
    probe_size : int
        Probe examples (stratified clean/noisy; capped at the training-set size).
    record_every : int
        Record every this many epochs (0 = only at the start and the end).
    record_every_steps : int
        Also record every this many optimizer steps (0 = off).
    eval_batch_size : int
        Batch size of the accuracy evaluation.
    data_dir : str or None
        Folder with the CIFAR-10 binary files.
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... Under ``torchrun``, ``"cuda"`` means each
        rank's ``cuda:LOCAL_RANK``.
    sync_epsilon : {"global", "replica"}
        Under ``torchrun`` with ``m = 0``: one ε from the global batch's gradient (default, the
        same run as one process) or each rank's own ε (m-sharpness with the local batch).
        Stored (with ``world_size``) only for runs of more than one process.
    amp : {"off", "bf16"}
        Autocast the training forward passes to bfloat16 (the SAM perturbation and the
        update use the float32 gradients; the probe and the curves are measured in float32).
        Stored only when on.
    """

    dataset: str = "mnist1d"
    model: str = "mlp"
    optimizer: str = "sgd"
    rho: float = 0.05
    m: int = 1
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 200
    seed: int = 0
    noise_rate: float = 0.3
    noise_mode: str = "symmetric"
    gamma_act: float = 1e-2
    gamma_weight: float = 1e-2
    val_fraction: float = 0.1
    n_samples: int | None = None
    width: int = 256
    probe_size: int = 256
    record_every: int = 10
    record_every_steps: int = 0
    eval_batch_size: int = 1024
    data_dir: str | None = None
    device: str = "cpu"
    sync_epsilon: str = "global"
    amp: str = "off"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping, ignoring keys that are not fields (e.g. stored attrs)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` (a ``ValueError``): one line about the first bad setting."""
        if self.dataset not in dataset_names():
            raise ConfigError(
                f"unknown dataset {self.dataset!r}; choose from {', '.join(dataset_names())}")
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}; choose from {', '.join(MODELS)}")
        if self.optimizer not in OPTIMIZER_NAMES:
            raise ConfigError(
                f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZER_NAMES)}")
        if self.sync_epsilon not in ("global", "replica"):
            raise ConfigError(f"sync_epsilon must be 'global' or 'replica', got "
                              f"{self.sync_epsilon!r}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r} "
                              "(float16 would need loss scaling of SAM's two passes; bfloat16 "
                              "does not)")
        if self.noise_mode not in NOISE_MODES:
            raise ConfigError(
                f"unknown noise mode {self.noise_mode!r}; choose from {', '.join(NOISE_MODES)}")
        if not _is_number(self.noise_rate) or not 0.0 <= float(self.noise_rate) < 1.0:
            raise ConfigError(f"noise rate must be in [0, 1), got {self.noise_rate!r}")
        if not _is_number(self.val_fraction) or not 0.0 <= float(self.val_fraction) < 1.0:
            raise ConfigError(f"val fraction must be in [0, 1), got {self.val_fraction!r}")
        for name in ("rho", "momentum", "weight_decay", "gamma_act", "gamma_weight"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if not _is_number(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        for name in ("batch_size", "epochs", "width", "probe_size", "eval_batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("m", "seed", "record_every", "record_every_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if self.n_samples is not None and (not _is_int(self.n_samples) or self.n_samples < 1):
            raise ConfigError(f"n_samples must be a positive integer, got {self.n_samples!r}")
        if self.dataset == "cifar10":
            if not self.data_dir:
                raise ConfigError("cifar10 needs --data-dir (data_dir=...): the folder with the "
                                 "official binary CIFAR-10 files")
            if not Path(self.data_dir).expanduser().is_dir():
                raise ConfigError(f"data dir {self.data_dir!r} is not a folder")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ConfigError(f"bad device {self.device!r}: {err}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"device {self.device!r} is not available (no CUDA on this machine)")
        if device.type == "cuda" and device.index is not None and (
                device.index >= torch.cuda.device_count()):
            raise ConfigError(f"device {self.device!r} does not exist "
                             f"({torch.cuda.device_count()} CUDA devices)")
        return self

    def attrs(self) -> dict[str, Any]:
        """The configuration as run attributes (scalars and strings; no runtime fields)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in RUNTIME_FIELDS:
                continue
            value = getattr(self, f.name)
            out[f.name] = 0 if value is None else value  # n_samples None -> 0 (= all)
        if self.amp != "off":
            out["amp"] = self.amp
        return out


def _config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return dataclasses.replace(config)
    if isinstance(config, Mapping):
        unknown = set(config) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return TrainConfig(**config)
    raise TypeError(f"config must be a TrainConfig or a mapping, got {type(config).__name__}")


def run_summary_line(ds: xr.Dataset, seconds: float | None = None) -> str:
    """One line: the run's method and its best / final test accuracy."""
    a = ds.attrs
    method = a.get("optimizer", "?")
    extra = "" if method in ("sgd", "regsgd") else f" rho={a.get('rho')} m={a.get('m')}"
    parts = [f"{a.get('dataset', '?')}/{a.get('model', '?')} {method}{extra} "
             f"seed={a.get('seed')} noise={a.get('noise_rate')}"]
    if "test_accuracy" in ds.data_vars and ds.sizes.get("step", 0):
        acc = np.asarray(ds["test_accuracy"].values, dtype=float)
        if (~np.isnan(acc)).any():
            best = int(np.nanargmax(acc))
            epoch = float(ds["epoch"].values[best]) if "epoch" in ds.coords else math.nan
            parts.append(f"best test acc {acc[best]:.2%} at epoch {epoch:g}")
            parts.append(f"final {acc[~np.isnan(acc)][-1]:.2%}")
        if "noisy_train_accuracy" in ds.data_vars:
            noisy = float(ds["noisy_train_accuracy"].values[-1])
            if not math.isnan(noisy):
                parts.append(f"noisy-label fit {noisy:.2%}")
    if seconds is not None:
        parts.append(f"{seconds:.1f} s")
    return ", ".join(parts)


def _distributed(cfg: TrainConfig) -> tuple[int, int, bool]:
    """``(rank, world size, whether we initialized the process group)``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is
    initialized from the environment: gloo on CPU, NCCL on CUDA (each rank on
    ``cuda:LOCAL_RANK``).
    """
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    cuda = torch.device(cfg.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def train(
    config: TrainConfig | Mapping[str, Any],
    out: str | PathLike | None = None,
    *,
    progress: bool = True,
    overwrite: bool = False,
    flush_every: int = 16,
    flush_seconds: float = 30.0,
) -> xr.Dataset | None:
    """Train one model with one optimizer and record it.

    Under ``torchrun`` (or in a process group initialized beforehand), run the same call in
    every rank: the model is wrapped in ``DistributedDataParallel``, each global batch of
    ``batch_size`` examples (drawn as in one process) is split into equal shares, one per
    rank (``batch_size`` must be a multiple of the world size; the last batch of an epoch is
    trimmed to one), and the run is the one process would train (exactly so for 1-SAM, group
    SAM and, with ``sync_epsilon="global"``, batch SAM). Each rank measures its share of the
    probe set and of the evaluation splits; rank 0 gathers them and is the store's only
    writer.

    Parameters
    ----------
    config : TrainConfig or mapping
        What to run (validated first: a bad setting raises :class:`ConfigError`, a
        ``ValueError``, before any work).
    out : path, optional
        The zarr store to stream the run to, created before the data are loaded: a path that
        exists (without ``overwrite``), that another live process writes or that cannot be
        written raises at once (``FileExistsError``, ``StoreLockedError``, ``OSError``).
        ``None`` keeps the run in memory only.
    progress : bool
        Show a tqdm progress bar (on stderr; rank 0 only).
    overwrite : bool
        Replace an existing, finished or killed, run at ``out`` (never one being written).
    flush_every, flush_seconds : int, float
        Buffering of the store (see :class:`~sam_diagnostics.store.RunStore`).

    Returns
    -------
    xarray.Dataset or None
        The recorded run (SPEC section 3), with attrs ``complete=1`` (``None`` on the ranks
        other than 0 of a distributed run).
    """
    cfg = _config(config).validate()
    if out is not None and not isinstance(out, (str, PathLike)):
        raise TypeError(f"out must be a path or None, got {type(out).__name__}")
    rank, world, created = _distributed(cfg)
    try:
        if world > 1 and cfg.batch_size % world:
            raise ConfigError(f"batch size {cfg.batch_size} is not a multiple of the "
                              f"{world} ranks (each takes an equal share of every batch)")
        store = None
        if out is not None:
            attrs = {**cfg.attrs(), **({"world_size": world, "sync_epsilon": cfg.sync_epsilon}
                                       if world > 1 else {})}
            store = rank0_creates(lambda: RunStore(
                out, attrs=attrs, overwrite=overwrite, flush_every=flush_every,
                flush_seconds=flush_seconds), distributed=world > 1)
        try:
            return _train(cfg, store, progress and rank == 0, rank, world)
        except BaseException:
            if store is not None:
                store.discard()  # no step written: remove it (and put back a replaced run)
            raise
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


class _ShardedBatches:
    """This rank's equal share of every batch of ``batches`` (the last batch trimmed to a
    multiple of ``world``; a batch of fewer than ``world`` examples skipped)."""

    def __init__(self, batches: BatchSampler, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self):
        for batch in self.batches:
            share = len(batch) // self.world
            if share:
                yield batch[self.rank * share:(self.rank + 1) * share]

    def __len__(self) -> int:
        n = len(self.batches.sampler)
        full, rest = divmod(n, self.batches.batch_size)
        return full + (rest >= self.world)


def _stepper(cfg: TrainConfig, model: torch.nn.Module, net: torch.nn.Module):
    """The run's optimizer over ``net`` (the DDP wrapper of ``model``, or ``model``)."""
    from .optim import SAM, make_optimizer

    if cfg.optimizer in ("sam", "lsam", "jsam") and net is not model:
        base = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                               momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        return SAM(net, base, rho=cfg.rho, m=m_from_disk(cfg.m), variant=cfg.optimizer,
                   sync_epsilon=cfg.sync_epsilon)
    return make_optimizer(cfg.optimizer, net, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, rho=cfg.rho, m=m_from_disk(cfg.m),
                          gamma_act=cfg.gamma_act, gamma_weight=cfg.gamma_weight)


def _train(cfg: TrainConfig, store: RunStore | None, progress: bool, rank: int = 0,
           world: int = 1) -> xr.Dataset | None:
    from tqdm.auto import tqdm

    device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        splits = load_dataset(cfg.dataset, noise=cfg.noise_rate, noise_mode=cfg.noise_mode,
                              seed=cfg.seed, val_fraction=cfg.val_fraction,
                              data_dir=cfg.data_dir, n_samples=cfg.n_samples)
    except ValueError as err:  # missing/corrupt data files, sizes the source cannot give
        raise ConfigError(str(err)) from err
    try:
        model = build_model(cfg.model, splits.input_shape, splits.num_classes, width=cfg.width,
                            seed=cfg.seed).to(device)
        net = model
        if world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        stepper = _stepper(cfg, model, net)
    except ValueError as err:  # e.g. a model that does not fit the data's input shape
        raise ConfigError(str(err)) from err
    generator = torch.Generator().manual_seed(cfg.seed)  # the same batches on every rank
    sampler: Any = BatchSampler(RandomSampler(splits.train, generator=generator),
                                cfg.batch_size, drop_last=False)
    if world > 1:
        sampler = _ShardedBatches(sampler, rank, world)
    # each fetch indexes the dataset with a whole batch of positions: no per-example collate
    loader = DataLoader(splits.train, sampler=sampler, batch_size=None)
    steps_per_epoch = len(loader)
    # no cache of the bf16 weight casts: SAM moves the weights to w + ε in place between the
    # passes of one step, and a cached cast would evaluate the perturbed pass at w
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16",
                         cache_enabled=False)
    config = {**cfg.attrs(), **({"world_size": world, "sync_epsilon": cfg.sync_epsilon}
                                if world > 1 else {})}

    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        rec = Recorder(model, store, probe=cfg.probe_size, train=splits.train,
                       test=splits.test, val=splits.val, config=config,
                       every_epochs=cfg.record_every, every_steps=cfg.record_every_steps,
                       steps_per_epoch=steps_per_epoch, rho=cfg.rho, m=m_from_disk(cfg.m),
                       probe_seed=cfg.seed, eval_batch_size=cfg.eval_batch_size,
                       keep=store is None and rank == 0, distributed=world > 1)
        bar = tqdm(total=cfg.epochs * steps_per_epoch, disable=not progress, unit="step",
                   desc=f"{cfg.optimizer} seed {cfg.seed}", dynamic_ncols=True, leave=True)
        try:
            with rec:
                model.train()
                for epoch in range(cfg.epochs):
                    for inputs, targets, _ in loader:
                        inputs = inputs.to(device, non_blocking=True)
                        targets = targets.to(device, non_blocking=True)
                        with amp:  # forward passes in bf16; gradients and ε in float32
                            loss = stepper.step(inputs, targets)
                        record = rec.step(loss)
                        bar.update(1)
                        if record is not None and "test_accuracy" in record:
                            bar.set_postfix(epoch=epoch + 1,
                                            test_acc=f"{float(record['test_accuracy'][0]):.3f}",
                                            refresh=False)
                if rec.last_recorded_step != rec.global_step:
                    rec.record()  # the final state, if the schedule skipped it
        finally:
            bar.close()
    return rec.dataset() if rank == 0 else None

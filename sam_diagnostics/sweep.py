"""Sweeps: a grid of optimizers x seeds (x rho) run into one folder, resumable.

:func:`plan_sweep` names one run store per configuration (:func:`run_filename`),
:func:`pending_runs` keeps those not finished yet (a finished run is skipped, an unfinished one
redone, one being written by another live process is left to it, a run of another
configuration is refused) and :func:`run_sweep` runs them: in this process, on a
``dask.distributed`` LocalCluster (``jobs`` worker processes), or on any dask cluster given by
its scheduler's address (Slurm/PBS through dask-jobqueue, Kubernetes...; ``docs/scale.md``).

Examples
--------
>>> from sam_diagnostics.train import TrainConfig
>>> run_filename(TrainConfig(optimizer="sam", rho=0.05, m=1, seed=3))
'sam-rho0.05-m1-seed3.zarr'
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .runs import EmptyRunError, NotARunError, open_run
from .store import StoreLockedError, read_lock
from .train import ConfigError, TrainConfig

__all__ = ["run_filename", "plan_sweep", "pending_runs", "run_sweep"]


def run_filename(cfg: TrainConfig) -> str:
    """The store name of one sweep configuration (``rho``/``m`` only for SAM variants)."""
    if cfg.optimizer in ("sgd", "regsgd"):
        return f"{cfg.optimizer}-seed{cfg.seed}.zarr"
    return f"{cfg.optimizer}-rho{cfg.rho:g}-m{cfg.m}-seed{cfg.seed}.zarr"


def plan_sweep(base: TrainConfig, out_dir: Path, optimizers: Sequence[str],
               seeds: Sequence[int], rhos: Sequence[float]) -> list[tuple[TrainConfig, Path]]:
    """Every (configuration, store path) of the grid; each configuration validated.

    ``sgd`` and ``regsgd`` ignore rho and run once, at the first value.

    Examples
    --------
    >>> from pathlib import Path
    >>> plan = plan_sweep(TrainConfig(), Path("runs"), ["sgd", "sam"], [0, 1], [0.05, 0.1])
    >>> [path.name for _, path in plan][:3]
    ['sgd-seed0.zarr', 'sgd-seed1.zarr', 'sam-rho0.05-m1-seed0.zarr']
    """
    plan = []
    for optimizer in optimizers:
        for rho in rhos[:1] if optimizer in ("sgd", "regsgd") else rhos:
            for seed in seeds:
                cfg = dataclasses.replace(base, optimizer=optimizer, rho=rho, seed=seed).validate()
                plan.append((cfg, out_dir / run_filename(cfg)))
    return plan


def _same_value(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


def run_state(path: Path, cfg: TrainConfig) -> str:
    """``"missing"``, ``"complete"``, ``"incomplete"`` or ``"running"`` (another live writer).

    Raises :class:`~sam_diagnostics.train.ConfigError` when ``path`` holds another
    configuration or something that is not a run.
    """
    if read_lock(path) is not None:
        return "running"
    if not path.exists():
        return "missing"
    try:
        attrs = open_run(path, load=False, warn=False).attrs
    except EmptyRunError:
        return "incomplete"
    except NotARunError as err:
        raise ConfigError(f"{err}; move it away or use another --out") from None
    for key, value in cfg.attrs().items():
        if key in attrs and not _same_value(attrs[key], value):
            raise ConfigError(f"{str(path)!r} holds another configuration ({key}={attrs[key]!r}, "
                              f"asked {value!r}); use another --out or --overwrite")
    return "complete" if int(attrs.get("complete", 0)) == 1 else "incomplete"


def pending_runs(plan: Iterable[tuple[TrainConfig, Path]], *, overwrite: bool = False,
                 echo: Callable[[str], None] = print) -> list[tuple[TrainConfig, Path]]:
    """The runs of ``plan`` still to do (all of them with ``overwrite``, except running ones).

    Examples
    --------
    >>> from pathlib import Path
    >>> import tempfile
    >>> plan = plan_sweep(TrainConfig(), Path(tempfile.mkdtemp()), ["sgd"], [0], [0.05])
    >>> len(pending_runs(plan))
    1
    """
    todo = []
    for cfg, path in plan:
        state = "running" if read_lock(path) is not None else (
            "missing" if overwrite else run_state(path, cfg))
        if state == "complete":
            echo(f"{path}: done, skipped")
        elif state == "running":
            writer = read_lock(path) or {}
            echo(f"{path}: being written by pid {writer.get('pid', '?')} on "
                 f"{writer.get('host', '?')}, skipped")
        else:
            todo.append((cfg, path))
    return todo


def _worker(cfg_dict: dict, out: str, threads: int | None, flush_every: int,
            progress: bool = False) -> str:
    from .train import run_summary_line, train

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    start = time.perf_counter()
    ds = train(TrainConfig(**cfg_dict), out, progress=progress, overwrite=True,
               flush_every=flush_every)
    return f"{out}: {run_summary_line(ds, time.perf_counter() - start)}"


def _failure(path: Path, err: BaseException) -> str:
    message = " ".join(str(err).split()) or type(err).__name__
    return f"{path}: failed: {message}"


def _outcome(path: Path, call: Callable[[], str], failed: list[Path]) -> str:
    """The run's line: its summary, ``skipped`` (another writer took it) or ``failed``."""
    try:
        return call()
    except StoreLockedError as err:
        return f"{path}: skipped: {' '.join(str(err).split())}"
    except Exception as err:  # any failure of one run is reported; the sweep goes on
        failed.append(path)
        return _failure(path, err)


def _cluster(jobs: int, scheduler: str | None):
    """A dask client: on the scheduler at ``scheduler``, else on a new LocalCluster of
    ``jobs`` worker processes with one thread each; returns ``(client, cluster or None)``."""
    import logging

    from dask.distributed import Client, LocalCluster

    if scheduler is not None:
        return Client(scheduler, timeout="30s"), None
    cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR,
                           env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    return Client(cluster), cluster


def run_sweep(todo: Sequence[tuple[TrainConfig, Path]], *, jobs: int = 1,
              threads: int | None = None, flush_every: int = 16, progress: bool = False,
              echo: Callable[[str], None] = print, scheduler: str | None = None) -> list[Path]:
    """Run ``todo``; print one line per finished run (``[i/N] ...``); return the failed paths.

    With ``jobs == 1`` and no ``scheduler`` the runs go one after the other in this process.
    Otherwise each run is one task of a ``dask.distributed`` cluster: a ``LocalCluster`` of
    ``jobs`` worker processes (one thread each) started here, or the existing cluster whose
    scheduler listens at ``scheduler`` (e.g. ``"tcp://10.0.0.5:8786"``, a Slurm or Kubernetes
    cluster of dask-jobqueue / dask-kubernetes; its workers must see ``todo``'s paths). In a
    task, torch uses ``threads`` threads (default 1).

    A run that fails (a full disk, a worker that dies, ...) is reported in one line and the
    others go on; a run another process started meanwhile (e.g. a second sweep of the same
    folder) is left to it. Runs are deterministic: a run's store is the same whichever way it
    ran (with the same torch thread count).

    Examples
    --------
    >>> failed = run_sweep(pending_runs(plan), jobs=2)  # doctest: +SKIP
    >>> failed = run_sweep(pending_runs(plan), scheduler="tcp://10.0.0.5:8786")  # doctest: +SKIP
    """
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        raise ConfigError(
            f"the sweep was started under torchrun (WORLD_SIZE={world}): every rank would run "
            "the whole sweep. Start the sweep once, without torchrun (its runs go to dask "
            "workers); torchrun is for one large run (`sam-diagnostics train` with DDP)")
    failed: list[Path] = []
    if scheduler is None and (jobs == 1 or len(todo) == 1):
        for i, (cfg, path) in enumerate(todo, 1):
            line = _outcome(path, lambda cfg=cfg, path=path: _worker(
                dataclasses.asdict(cfg), str(path), threads, flush_every, progress), failed)
            echo(f"[{i}/{len(todo)}] {line}")
        return failed
    from dask.distributed import as_completed

    client, cluster = _cluster(jobs, scheduler)
    try:
        where = (f"the dask scheduler at {scheduler}" if cluster is None
                 else f"a local dask cluster of {jobs} worker processes")
        workers = len(client.scheduler_info(n_workers=-1).get("workers", {}))
        echo(f"sweep: {len(todo)} runs on {where} ({workers} workers now)")
        futures = {client.submit(_worker, dataclasses.asdict(cfg), str(path),
                                 threads if threads is not None else 1, flush_every,
                                 key=f"sam-diagnostics-{path.name}-{uuid.uuid4().hex[:8]}",
                                 pure=False, retries=0): path
                   for cfg, path in todo}
        for i, future in enumerate(as_completed(futures), 1):
            path = futures[future]
            echo(f"[{i}/{len(todo)}] {_outcome(path, future.result, failed)}")
            future.release()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return failed

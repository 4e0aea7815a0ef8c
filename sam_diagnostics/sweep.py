"""Sweeps: a grid of optimizers x seeds (x rho) run into one folder, resumable.

:func:`plan_sweep` names one run store per configuration (:func:`run_filename`),
:func:`pending_runs` keeps those not finished yet (a finished run is skipped, an unfinished one
redone, one being written by another live process is left to it, a run of another
configuration is refused) and :func:`run_sweep` runs them, one process per job
(``concurrent.futures``; the dask-based scheduler of a later issue can replace this function).

Examples
--------
>>> from sam_diagnostics.train import TrainConfig
>>> run_filename(TrainConfig(optimizer="sam", rho=0.05, m=1, seed=3))
'sam-rho0.05-m1-seed3.zarr'
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
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


def run_sweep(todo: Sequence[tuple[TrainConfig, Path]], *, jobs: int = 1,
              threads: int | None = None, flush_every: int = 16, progress: bool = False,
              echo: Callable[[str], None] = print) -> list[Path]:
    """Run ``todo`` (``jobs`` processes); print one line per run; return the failed paths.

    A run that fails (a full disk, ...) is reported in one line and the others go on; a run
    another process started meanwhile (e.g. a second sweep of the same folder) is left to it.

    Examples
    --------
    >>> failed = run_sweep(pending_runs(plan), jobs=2, threads=1)  # doctest: +SKIP
    """
    failed: list[Path] = []
    expected = (ConfigError, OSError, ValueError)
    if jobs == 1 or len(todo) == 1:
        for i, (cfg, path) in enumerate(todo, 1):
            try:
                line = _worker(dataclasses.asdict(cfg), str(path), None, flush_every, progress)
            except StoreLockedError as err:
                line = f"{path}: skipped: {' '.join(str(err).split())}"
            except expected as err:
                line = _failure(path, err)
                failed.append(path)
            echo(f"[{i}/{len(todo)}] {line}")
        return failed
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_worker, dataclasses.asdict(cfg), str(path), threads,
                               flush_every): path for cfg, path in todo}
        for i, future in enumerate(as_completed(futures), 1):
            try:
                line = future.result()
            except StoreLockedError as err:
                line = f"{futures[future]}: skipped: {' '.join(str(err).split())}"
            except expected as err:
                line = _failure(futures[future], err)
                failed.append(futures[future])
            echo(f"[{i}/{len(todo)}] {line}")
    return failed

"""Stored runs: the schema, the zarr store that streams them, and reading them back.

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
import xarray as xr

__all__ = ["CONFIG_KEYS", "CURVES", "RunStore", "find_runs", "merge_runs", "open_run",
           "to_netcdf"]

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



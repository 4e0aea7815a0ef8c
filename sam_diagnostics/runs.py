"""Reading stored runs: open, check against the schema, find, merge, export.

:func:`open_run` reads zarr or netCDF only (nothing in a file is executed or unpickled) and
refuses anything that is not a run of a schema version it knows; a run that is still being
written or was killed opens with what it flushed and warns that it is incomplete.
:func:`validate_run` lists every way a store departs from :mod:`~sam_diagnostics.schema`.

Examples
--------
>>> import sam_diagnostics as sd
>>> sd.open_run("missing.zarr")
Traceback (most recent call last):
...
FileNotFoundError: no run at 'missing.zarr'
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401 - its exit hook must precede ours
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .schema import (
    CONFIG_KEYS,
    COORDS,
    SCHEMA_VERSION,
    SUPPORTED_VERSIONS,
    VARIABLES,
)
from .store import NETCDF_SUFFIXES, clean_attrs, is_zarr_dir, read_lock

__all__ = ["NotARunError", "EmptyRunError", "IncompleteRunWarning", "Validation",
           "open_run", "open_runs", "validate_run", "find_runs", "merge_runs", "to_netcdf",
           "run_label"]

#: Per-example coordinates; :func:`merge_runs` gives them a ``run`` dimension.
_EXAMPLE_COORDS = ("is_noisy", "label", "true_label")


class NotARunError(ValueError):
    """The path exists but holds no run of a schema version this library reads."""


class EmptyRunError(ValueError):
    """A run store that holds no recorded step yet (still starting, or stopped before it)."""


class IncompleteRunWarning(UserWarning):
    """The run did not finish (it is still being written, or it was killed)."""


def _netcdf_engine() -> str:
    import importlib.util

    if importlib.util.find_spec("netCDF4") is not None:
        return "netcdf4"
    if importlib.util.find_spec("h5netcdf") is not None and importlib.util.find_spec("h5py"):
        return "h5netcdf"
    raise ImportError("netCDF I/O needs the netCDF4 package (pip install netCDF4)")


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


def _as_path(path: Any, what: str = "path") -> Path:
    if not isinstance(path, (str, PathLike)):
        raise TypeError(f"{what} must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path).expanduser()


def schema_version(attrs: dict) -> int:
    """The schema version of a run's attributes; raises :class:`NotARunError` if not a run."""
    if "schema_version" in attrs:
        try:
            version = int(attrs["schema_version"])
        except (TypeError, ValueError):
            raise NotARunError(f"bad schema_version {attrs['schema_version']!r}") from None
        if version not in SUPPORTED_VERSIONS:
            raise NotARunError(
                f"schema version {version} is not one this sam_diagnostics reads "
                f"({', '.join(map(str, SUPPORTED_VERSIONS))}); "
                + ("upgrade sam_diagnostics" if version > SCHEMA_VERSION else "convert it"))
        return version
    if "sam_diagnostics_version" in attrs:
        return 0  # written before schema_version existed
    raise NotARunError("it has no schema_version attribute: not a run written by "
                       "sam_diagnostics")


def _incomplete_message(p: Path, ds: xr.Dataset) -> str:
    writer = read_lock(p)
    why = (f"still being written by pid {writer.get('pid')} on host {writer.get('host')}"
           if writer else "its writer stopped before finishing (killed or crashed)")
    return (f"{str(p)!r} is an incomplete run ({why}); it holds the "
            f"{ds.sizes.get('step', 0)} recorded steps flushed so far")


def open_run(path: str | PathLike, *, load: bool = True, warn: bool = True,
             chunks: Any = None) -> xr.Dataset:
    """Open one stored run (a zarr store or a netCDF file).

    Only zarr and netCDF readers are used: nothing in the file is executed or unpickled.
    A run that is still being written or was killed opens with every flushed step; its
    ``complete`` attribute is 0 and an :class:`IncompleteRunWarning` says so.

    Parameters
    ----------
    path : path
        A zarr folder or a netCDF file.
    load : bool
        Read everything into memory and close the file (default); ``False`` keeps it lazy.
    warn : bool
        Warn when the run is incomplete.
    chunks : dict or "auto", optional
        Open lazily as dask arrays with these chunks (``{}``: the store's own chunks);
        implies ``load=False``.

    Raises
    ------
    FileNotFoundError
        Nothing at ``path``.
    NotARunError
        ``path`` is not a run: an empty or foreign folder, a file that is not netCDF, a store
        without ``schema_version``, or a schema version this library does not read.
    EmptyRunError
        A run store that holds no recorded step yet.

    Examples
    --------
    >>> ds = open_run("run.zarr")  # doctest: +SKIP
    >>> ds["test_accuracy"].attrs["units"]  # doctest: +SKIP
    '1'
    """
    p = _as_path(path)
    if not p.exists():
        raise FileNotFoundError(f"no run at {str(p)!r}")
    if p.is_file():
        engine = _netcdf_engine()
        try:
            ds = xr.open_dataset(p, engine=engine, decode_times=False, chunks=chunks)
        except Exception as err:
            raise NotARunError(f"{str(p)!r} is not a run: not a netCDF file "
                               f"({type(err).__name__})") from None
    elif not is_zarr_dir(p):
        kind = "an empty folder" if not any(p.iterdir()) else "a folder but not a zarr store"
        raise NotARunError(f"{str(p)!r} is not a run: it is {kind}")
    else:
        try:
            ds = xr.open_zarr(p, consolidated=_has_consolidated(p), chunks=chunks,
                              decode_times=False)
        except Exception as err:
            raise NotARunError(f"{str(p)!r} is not a readable run store "
                               f"({type(err).__name__}: {err})") from None
    try:
        schema_version(ds.attrs)
    except NotARunError as err:
        ds.close()
        raise NotARunError(f"{str(p)!r} is not a run: {err}") from None
    wrong = _dim_problems(ds)
    if wrong:
        ds.close()
        raise NotARunError(f"{str(p)!r} does not follow the run schema: {wrong[0]} "
                           "(check it with sam-diagnostics validate)")
    if not ds.data_vars or "step" not in ds.dims:
        ds.close()
        writer = read_lock(p)
        why = (f"it is being written by pid {writer.get('pid')} on host {writer.get('host')}"
               if writer else "the run stopped before its first write completed")
        raise EmptyRunError(f"{str(p)!r} holds no finished step yet: {why}")
    if load and chunks is None:
        ds = ds.load()
        ds.close()
    if warn and "complete" in ds.attrs and int(ds.attrs["complete"]) != 1:
        warnings.warn(_incomplete_message(p, ds), IncompleteRunWarning, stacklevel=2)
    return ds


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _dim_problems(ds: xr.Dataset) -> list[str]:
    """Schema variables whose dimensions (apart from ``run``) differ from the schema's."""
    problems = []
    for vname, var in ds.data_vars.items():
        entry = VARIABLES.get(vname)
        dims = tuple(d for d in var.dims if d != "run")
        if entry is not None and dims != entry.dims:
            problems.append(f"{vname!r} has dims {dims}, the schema says {entry.dims}")
    return problems


@dataclass
class Validation:
    """What :func:`validate_run` found: ``problems`` break the schema, ``notes`` inform."""

    path: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    steps: int = 0
    complete: bool = False

    @property
    def ok(self) -> bool:
        """True when the store follows the schema (an incomplete run can be ok)."""
        return not self.problems

    def __str__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        head = f"{self.path}: {'ok' if self.ok else 'INVALID'}"
        if self.steps:
            head += f" ({self.steps} steps, {state})"
        return "\n".join([head, *(f"  problem: {p}" for p in self.problems),
                          *(f"  note: {n}" for n in self.notes)])


def validate_run(path: str | PathLike | xr.Dataset) -> Validation:
    """Check a stored run against :mod:`~sam_diagnostics.schema`.

    Checks that it opens as a run of a known ``schema_version``; that every variable and
    coordinate has ``long_name`` and ``units``; that known variables have their dimensions
    and a floating dtype; that ``step`` increases; that attributes are scalars. A killed or
    running store is valid (with a note) when its flushed steps are.

    Parameters
    ----------
    path : path or xarray.Dataset

    Returns
    -------
    Validation
        ``.ok``, ``.problems``, ``.notes``; ``str()`` gives a report.

    Examples
    --------
    >>> v = validate_run("run.zarr")  # doctest: +SKIP
    >>> v.ok, v.problems  # doctest: +SKIP
    (True, [])
    """
    name = "<dataset>" if isinstance(path, xr.Dataset) else str(_as_path(path))
    result = Validation(name)
    if isinstance(path, xr.Dataset):
        ds = path
        try:
            schema_version(ds.attrs)
        except NotARunError as err:
            result.problems.append(str(err))
    else:
        try:
            ds = open_run(path, load=False, warn=False)
        except (FileNotFoundError, NotARunError, EmptyRunError) as err:
            result.problems.append(str(err))
            return result
    version = ds.attrs.get("schema_version")
    if version is None and "sam_diagnostics_version" in ds.attrs:
        result.notes.append("written before schema_version existed (version 0)")
    result.steps = int(ds.sizes.get("step", 0))
    result.complete = int(ds.attrs.get("complete", 1 if "run" in ds.dims else 0)) == 1
    if not result.complete and "run" not in ds.dims:
        result.notes.append("incomplete: the run is still being written or was killed; "
                            "its flushed steps are readable")
    for key, value in ds.attrs.items():
        if not isinstance(value, (int, float, str, np.integer, np.floating)):
            result.problems.append(f"attribute {key!r} is not a scalar or a string")
    for vname, var in ds.variables.items():
        missing = [a for a in ("long_name", "units") if a not in var.attrs]
        if missing and vname not in ("run", "example_id", *CONFIG_KEYS):
            result.problems.append(f"{vname!r} has no {' or '.join(missing)}")
    result.problems.extend(_dim_problems(ds))
    for vname, var in ds.data_vars.items():
        if vname not in VARIABLES:
            result.notes.append(f"{vname!r} is not a schema variable")
        elif not np.issubdtype(var.dtype, np.floating):
            result.problems.append(f"{vname!r} has dtype {var.dtype}, expected floating point")
    for cname in ("step", "epoch"):
        if "step" in ds.dims and cname not in ds.coords:
            result.problems.append(f"coordinate {cname!r} is missing")
    if "example" in ds.dims:
        for cname in ("example", "label", "is_noisy"):
            if cname not in ds.coords:
                result.problems.append(f"coordinate {cname!r} is missing")
    for cname, entry in COORDS.items():
        if cname in ds.coords and cname not in ("example",) and "run" not in ds.dims:
            if tuple(ds[cname].dims) != entry.dims:
                result.problems.append(f"coordinate {cname!r} has dims {ds[cname].dims}, the "
                                       f"schema says {entry.dims}")
    if "step" in ds.coords and ds.sizes.get("step", 0) > 1:
        if not (np.diff(np.asarray(ds["step"].values, dtype=float)) > 0).all():
            result.problems.append("'step' does not increase")
    if "is_noisy" in ds.coords and ds["is_noisy"].dtype != bool:
        result.problems.append("'is_noisy' is not boolean")
    if not isinstance(path, xr.Dataset):
        ds.close()
    return result


# --------------------------------------------------------------------------------------------
# Finding and merging
# --------------------------------------------------------------------------------------------


def find_runs(path: str | PathLike) -> list[Path]:
    """The runs at ``path``: itself if it is a run, else the zarr stores and netCDF files in it.

    ``path`` itself counts as a run when it is a file, a zarr store or a ``*.zarr`` folder
    (then :func:`open_run` says what is wrong with it). Hidden entries (``.*``, e.g. a store
    being created) are skipped.

    >>> find_runs("runs/")  # doctest: +SKIP
    [PosixPath('runs/sam-rho0.05-m1-seed0.zarr'), PosixPath('runs/sgd-seed0.zarr')]
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no run or folder at {str(p)!r}")
    if p.is_file() or is_zarr_dir(p) or p.suffix == ".zarr":
        return [p]
    runs = sorted(c for c in p.iterdir() if not c.name.startswith(".") and (
        is_zarr_dir(c) or c.is_file() and c.suffix in NETCDF_SUFFIXES))
    if not runs:
        raise FileNotFoundError(f"no runs (zarr stores or netCDF files) in {str(p)!r}")
    return runs


def run_label(path: str | PathLike) -> str:
    """A run's name from its path: the file or folder name without ``.zarr``/``.nc``.

    >>> run_label("runs/sam-rho0.05-m1-seed0.zarr")
    'sam-rho0.05-m1-seed0'
    """
    name = Path(path).name
    for suffix in (".zarr", *NETCDF_SUFFIXES):
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
        (run, step). The configuration (:data:`~sam_diagnostics.schema.CONFIG_KEYS`) becomes
        ``run`` coordinates; attrs keep what all runs share.

    Examples
    --------
    >>> merged = merge_runs("runs/")  # doctest: +SKIP
    >>> merged.where(merged.optimizer == "jsam", drop=True)  # doctest: +SKIP
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
            datasets.append(open_run(_as_path(item, "each run"), warn=False))
            default_names.append(run_label(item))
    return _merge(datasets, default_names, names)


def glob_runs(pattern: str) -> list[Path]:
    """The runs (zarr stores, netCDF files) whose paths match the glob ``pattern``."""
    import glob

    paths = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser())))
    runs = [p for p in paths if not p.name.startswith(".") and (
        is_zarr_dir(p) or p.is_file() and p.suffix in NETCDF_SUFFIXES)]
    if not runs:
        raise FileNotFoundError(f"no runs (zarr stores or netCDF files) match {pattern!r}")
    return runs


def open_runs(
    runs: str | PathLike | Iterable[str | PathLike],
    *,
    names: Sequence[str] | None = None,
    chunks: Any = None,
) -> xr.Dataset:
    """Many stored runs as one lazily loaded Dataset over a ``run`` dimension.

    Like :func:`merge_runs` (same layout: configuration as ``run`` coordinates, ``step``
    outer-joined, ``example`` as positions with ids in ``example_id``), but nothing is read
    beyond the metadata and the coordinates: every data variable is a dask array with one
    chunk per run and stored chunk, read when computed (``.compute()``, ``.values``, a plot).
    Memory then grows with what a computation touches, not with the number of runs: a
    summary of the training curves of hundreds of runs reads only the curves.

    Parameters
    ----------
    runs : path, glob pattern or iterable of paths
        A folder of runs (see :func:`find_runs`), one run, a pattern such as
        ``"runs/sam-*.zarr"``, or paths. Stores that hold no step yet are skipped with a
        warning.
    names : sequence of str, optional
        Values of the ``run`` coordinate (default: the store names without suffix).
    chunks : dict, optional
        dask chunks of each run (default ``{}``: the stores' own chunks, e.g. 16 steps x all
        probe examples).

    Returns
    -------
    xarray.Dataset
        dask-backed; ``sam_diagnostics.summary.summary_table`` and ``sam-diagnostics plot``
        take it as they take :func:`merge_runs`'s result.

    Examples
    --------
    >>> ds = open_runs("runs/*.zarr")  # doctest: +SKIP
    >>> ds.test_accuracy.max("step").groupby("optimizer").mean().compute()  # doctest: +SKIP
    """
    if isinstance(runs, (str, PathLike)):
        text = str(runs)
        paths = glob_runs(text) if any(c in text for c in "*?[") else find_runs(runs)
    else:
        paths = [_as_path(r, "each run") for r in runs]
    if not paths:
        raise ValueError("open_runs needs at least one run")
    datasets, default_names, kept_names = [], [], []
    for i, path in enumerate(paths):
        try:
            datasets.append(open_run(path, warn=False, chunks={} if chunks is None else chunks))
        except EmptyRunError as err:
            warnings.warn(f"skipped: {' '.join(str(err).split())}", IncompleteRunWarning,
                          stacklevel=2)
            continue
        default_names.append(run_label(path))
        if names is not None:
            kept_names.append(names[i])
    if not datasets:
        raise EmptyRunError("no run holds a recorded step yet")
    return _merge(datasets, default_names, kept_names if names is not None else None)


def _merge(datasets: list[xr.Dataset], default_names: list[str],
           names: Sequence[str] | None) -> xr.Dataset:
    """merge_runs' concatenation of opened runs (lazy when they are)."""
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
            id_attrs = ds["example"].attrs if "example" in ds.coords else {}
            ds = ds.drop_vars("example", errors="ignore").assign_coords(
                example=np.arange(ds.sizes["example"]), example_id=("example", ids))
            ds["example_id"].attrs = dict(id_attrs)
            ds["example"].attrs = {"long_name": "position in the run's probe set", "units": "1",
                                   "description": "ids are in example_id(run, example)"}
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

    Examples
    --------
    >>> to_netcdf("run.zarr", "run.nc")  # doctest: +SKIP
    PosixPath('run.nc')
    """
    if not isinstance(ds, xr.Dataset):
        ds = open_run(ds, warn=False)
    out = _as_path(path)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(out)!r}: the folder {str(out.parent)!r} "
                                "does not exist")
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{str(out)!r} already exists")
        if out.is_dir():
            raise FileExistsError(f"{str(out)!r} is a folder")
        out.unlink()
    ds = ds.copy()
    ds.attrs = clean_attrs(ds.attrs)
    for var in ds.variables.values():
        var.encoding = {}
        var.attrs = clean_attrs(var.attrs)
    ds.to_netcdf(out, engine=engine or _netcdf_engine(), format="NETCDF4")
    return out

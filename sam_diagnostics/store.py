"""The zarr writer of a run: created exclusively and up front, appended step by step.

A :class:`RunStore` is created before any training: in its constructor it takes the writer
lock ``RUN.zarr.lock`` (an OS file lock, so a killed writer never leaves a lock that blocks
anyone; the file names the writer's pid and host for the error message), checks the path, and
creates the store with its attributes (configuration, ``schema_version``, ``complete = 0``,
``writer``). So a second writer of the same path fails at once, naming the first; an unwritable
path fails before any work; ``overwrite=True`` never touches a store whose writer is alive, and
replaces a finished one atomically (the old store is only deleted after the new one holds a
step, and is put back if the new run stops before that).

The first record is written at once (from then on the store is never empty, and a run it
replaced is deleted); later records are buffered (``flush_every`` records, or sooner once
``flush_seconds`` passed) and appended along ``step``; chunks are written before the
consolidated metadata, so a run killed at any moment reopens with exactly its flushed steps
(:func:`~sam_diagnostics.open_run`).

Distributed runs (a later issue): one process owns a store (rank 0 gathers the ranks' records
and appends them); chunks hold all examples by default (``example_chunk``).

Examples
--------
>>> import xarray as xr, tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "run.zarr"
>>> store = RunStore(path, attrs={"optimizer": "sgd"}, flush_every=1)
>>> store.append(xr.Dataset({"train_loss": ("step", [0.5])}, coords={"step": [0]}))
>>> store.close(complete=True)
>>> from sam_diagnostics import open_run
>>> open_run(path).attrs["complete"]
1
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401 - its exit hook must precede ours
import functools
import json
import os
import shutil
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ._version import __version__
from .schema import RUN_ATTRS

__all__ = ["RunStore", "StoreLockedError", "WriterLock", "clean_attrs", "lock_path",
           "read_lock"]

_ZARR_MARKERS = (".zgroup", "zarr.json", ".zattrs")
NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".h5", ".hdf5", ".cdf")


class StoreLockedError(FileExistsError):
    """Another live process is writing this run store."""


# --------------------------------------------------------------------------------------------
# Attributes
# --------------------------------------------------------------------------------------------


def clean_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes as netCDF/zarr-safe scalars: bool -> int, None dropped, sequences -> JSON.

    >>> clean_attrs({"a": True, "b": None, "c": (1, 2)})
    {'a': 1, 'c': '[1, 2]'}
    """
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
                f"attribute {key!r} must be a scalar or a string, got {type(value).__name__}")
        out[str(key)] = value
    return out


# --------------------------------------------------------------------------------------------
# The writer lock
# --------------------------------------------------------------------------------------------


def lock_path(path: str | PathLike) -> Path:
    """The writer lock of the run at ``path``: ``RUN.zarr`` -> ``RUN.zarr.lock`` beside it."""
    p = Path(path).expanduser()
    return p.with_name(p.name + ".lock")


def read_lock(path: str | PathLike) -> dict[str, Any] | None:
    """Who holds the writer lock of ``path`` (``{"pid", "host", "since"}``), or ``None``.

    ``None`` when no live process holds it (no lock file, or a stale one left by a killed
    writer: the OS releases the lock when its process dies).
    """
    lp = lock_path(path)
    try:
        fd = os.open(lp, os.O_RDONLY)
    except OSError:
        return None
    try:
        import fcntl

        try:  # shared: readers never block each other, a writer's exclusive lock blocks us
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # held: read who holds it
            with open(lp) as f:
                try:
                    return json.loads(f.read() or "{}") or {"pid": "?", "host": "?"}
                except ValueError:
                    return {"pid": "?", "host": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _describe_writer(info: Mapping[str, Any]) -> str:
    since = info.get("since")
    when = f" since {since}" if since else ""
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}{when}"


class WriterLock:
    """An exclusive, OS-released lock on one run path (``RUN.zarr.lock``, POSIX ``flock``).

    Parameters
    ----------
    path : path
        The run store it protects.

    Raises
    ------
    StoreLockedError
        Another live process holds it (the message names its pid and host).
    OSError
        The folder cannot hold the lock (missing permissions, a file in the way).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> lock = WriterLock(pathlib.Path(tempfile.mkdtemp()) / "run.zarr")
    >>> lock.release()
    """

    def __init__(self, path: str | PathLike):
        import fcntl

        self.path = Path(path).expanduser()
        self.file = lock_path(self.path)
        self._fd: int | None = None
        for _ in range(10):
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                info = read_lock(self.path)
                if info is None:  # released meanwhile: try again
                    time.sleep(0.01)
                    continue
                raise StoreLockedError(
                    f"{str(self.path)!r} is being written by another process "
                    f"({_describe_writer(info)}); wait for it to finish or choose another "
                    "path") from None
            try:  # the file we locked must still be the one at the lock path
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
            self._fd = fd
            self.info = info
            return
        raise StoreLockedError(f"could not lock {str(self.path)!r}: it is contended")

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            self.file.unlink()
        except OSError:
            pass
        os.close(self._fd)  # closing releases the flock
        self._fd = None


# --------------------------------------------------------------------------------------------
# Zarr store
# --------------------------------------------------------------------------------------------


def is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in _ZARR_MARKERS)


def _check_replaceable(path: Path) -> None:
    """Raise unless ``path`` is a run (zarr store, netCDF file) or an empty folder."""
    if path.is_dir():
        if is_zarr_dir(path) or not any(path.iterdir()):
            return
        raise FileExistsError(
            f"refusing to overwrite {str(path)!r}: it is a folder that is not a zarr store")
    if path.suffix in NETCDF_SUFFIXES:
        return
    raise FileExistsError(f"refusing to overwrite {str(path)!r}: it is not a run store")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _flush_at_exit(ref: weakref.ref) -> None:
    store = ref()
    if store is not None and not store._closed:
        try:
            store.close()
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


def _consolidate(path: Path) -> None:
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path), zarr_format=2)


class RunStore:
    """An append-only zarr store of one run, created at once and written step by step.

    Parameters
    ----------
    path : path
        The zarr folder to create (``*.zarr`` by convention); missing parent folders are made.
    attrs : mapping, optional
        Run attributes (scalars/strings), written at creation.
    overwrite : bool
        Replace an existing run at ``path`` (only a zarr store, a netCDF file or an empty
        folder, and never one whose writer is still running). Without it an existing ``path``
        raises ``FileExistsError``.
    flush_every : int
        Recorded steps buffered per append (1 = write every record at once); the first
        record is always written at once.
    flush_seconds : float
        Also write as soon as a record arrives this long after the previous write.
    chunk_steps : int
        Chunk length along ``step`` (> 1 keeps the file count low).
    example_chunk : int, optional
        Chunk length along ``example`` (default: the whole probe set).

    Raises
    ------
    StoreLockedError
        Another live process writes ``path`` (a ``FileExistsError``; names its pid and host).
    FileExistsError
        ``path`` exists and ``overwrite`` is false, or it is not a run.
    OSError
        ``path`` cannot be created (permissions, a file where a folder should be).

    Notes
    -----
    Appends rewrite the consolidated metadata last, so a process killed mid-append leaves the
    previous, complete steps readable. Buffered records are flushed by :meth:`flush`,
    :meth:`close` and at interpreter exit (not on ``SIGKILL``).
    """

    def __init__(self, path: str | PathLike, *, attrs: Mapping[str, Any] | None = None,
                 overwrite: bool = False, flush_every: int = 16, flush_seconds: float = 30.0,
                 chunk_steps: int = 16, example_chunk: int | None = None):
        for name, value in (("flush_every", flush_every), ("chunk_steps", chunk_steps)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not flush_seconds >= 0:
            raise ValueError(f"flush_seconds must be >= 0, got {flush_seconds!r}")
        self.path = Path(path).expanduser()
        self.attrs = clean_attrs({**(attrs or {}), "complete": 0})
        self.flush_every = int(flush_every)
        self.flush_seconds = float(flush_seconds)
        self.chunk_steps = int(chunk_steps)
        self.example_chunk = example_chunk
        self._buffer: list[xr.Dataset] = []
        self._written = 0
        self._has_data = False
        self._closed = False
        self._replaced: Path | None = None
        self._last_write = time.monotonic()
        if self.path.exists() and not overwrite and not self.path.with_name(
                self.path.name + ".lock").exists():
            raise FileExistsError(f"{str(self.path)!r} already exists; choose another path "
                                  "or overwrite it")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = WriterLock(self.path)
        except StoreLockedError:
            raise
        except FileExistsError:  # a file where a folder should be
            raise NotADirectoryError(f"cannot create {str(self.path)!r}: "
                                     f"{str(self.path.parent)!r} is not a folder") from None
        except OSError as err:
            where = f"{err.filename!r}: " if err.filename else ""
            raise type(err)(err.errno, f"cannot create {str(self.path)!r}: {where}"
                            f"{(err.strerror or str(err)).lower()}") from None
        try:
            if self.path.exists():
                if not overwrite:
                    raise FileExistsError(f"{str(self.path)!r} already exists; choose another "
                                          "path or overwrite it")
                _check_replaceable(self.path)
            self._create()
        except BaseException:
            self._lock.release()
            raise
        self.attrs["writer"] = f"{os.getpid()}@{socket.gethostname()}"
        _register_exit_flush(functools.partial(_flush_at_exit, weakref.ref(self)))

    def _create(self) -> None:
        """Write the empty store beside ``path``, then move it into place in one rename."""
        import zarr

        self.attrs.update(**RUN_ATTRS,
                          sam_diagnostics_version=self.attrs.get("sam_diagnostics_version",
                                                                 __version__),
                          writer=f"{os.getpid()}@{socket.gethostname()}")
        tmp = self.path.with_name(f".{self.path.name}.creating-{os.getpid()}")
        _remove(tmp)
        try:
            group = zarr.open_group(str(tmp), mode="w-", zarr_format=2)
            group.attrs.update(self.attrs)
            _consolidate(tmp)
            if self.path.exists() or self.path.is_symlink():
                trash = self.path.with_name(f".{self.path.name}.replaced-{os.getpid()}")
                _remove(trash)
                os.rename(self.path, trash)
                self._replaced = trash
            os.rename(tmp, self.path)
        except BaseException:
            _remove(tmp)
            if self._replaced is not None and not self.path.exists():
                os.rename(self._replaced, self.path)
                self._replaced = None
            raise

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
        if (not self._has_data  # the first record at once: a started run is never empty
                or buffered >= self.flush_every
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
        if self._closed:
            raise ValueError(f"the store {str(self.path)!r} is closed")
        if len(self._buffer) == 1:
            ds = self._buffer[0]
        else:
            ds = xr.concat(self._buffer, dim="step", data_vars="minimal", coords="minimal",
                           compat="override", join="exact", combine_attrs="override")
        ds = ds.copy()
        ds.attrs = dict(self.attrs)
        if not self._has_data:
            for var in ds.variables.values():
                var.encoding = {}
            ds.to_zarr(self.path, mode="a", encoding=self._encoding(ds), consolidated=True,
                       zarr_format=2)
            self._has_data = True
            if self._replaced is not None:  # the new run holds a step: drop the old one
                _remove(self._replaced)
                self._replaced = None
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
        import zarr

        self.attrs.update(clean_attrs(attrs))
        self.flush()
        group = zarr.open_group(str(self.path), mode="r+", zarr_format=2)
        group.attrs.update(self.attrs)
        _consolidate(self.path)

    def discard(self) -> None:
        """Give up a store that holds no step yet: remove it, put back the run it replaced.

        Used when a run fails before its first record; does nothing once a step is written
        (then :meth:`close` marks the run incomplete instead).
        """
        if self._has_data or self._closed:
            self.close(complete=False if not self._closed else None)
            return
        self._buffer.clear()
        self._closed = True
        try:
            _remove(self.path)
            if self._replaced is not None:
                os.rename(self._replaced, self.path)
                self._replaced = None
        finally:
            self._lock.release()

    def close(self, complete: bool | None = None) -> None:
        """Flush, record ``complete`` if given (1 marks a finished run) and release the lock."""
        if self._closed:
            return
        try:
            if complete is not None:
                self.update_attrs(complete=int(bool(complete)))
            else:
                self.flush()
        finally:
            self._closed = True
            if self._replaced is not None and self._has_data:
                _remove(self._replaced)
            self._lock.release()

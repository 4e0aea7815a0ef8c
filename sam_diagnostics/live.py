"""Live scalars: a few numbers per record, mirrored to TensorBoard or a framework's logger.

The store keeps every per-example value; while a run trains, a researcher watches a handful of
headline curves. :func:`live_summary` condenses one record (the dataset that
:meth:`~sam_diagnostics.Recorder.record` returns, or a :class:`~sam_diagnostics.Probe`
measurement) into a flat ``{name: float}`` dict:

- ``logit_scale/{clean,noisy}_{sgd,sam}``: mean logit scale ``‖δ_i‖₂`` of the clean / noisy
  probe examples at ``w`` (SGD view) and at ``w + ε_i`` (SAM view), and
  ``logit_scale_ratio/{clean,noisy}`` = mean(SAM view) / mean(SGD view) — the paper's first
  effect (``all`` instead of clean/noisy when the probe set has no ``is_noisy``);
- ``jacobian_norm/...`` and ``jacobian_norm_ratio/...`` likewise (the second effect);
- ``activation_norm/<layer>`` (SGD view, all probe examples), ``weight_norm/last_layer`` and
  ``weight_norm/<module>``;
- the training curves present in the record: ``accuracy/{train,clean_train,noisy_train,test,
  val}`` and ``loss/{train,test,batch}``.

Ratios are ratios of example means, as in :func:`~sam_diagnostics.plots.plot_logit_scale`.
Sinks receive ``sink.log(scalars, step)``: :class:`TensorBoardSink` (``torch.utils.tensorboard``,
needs the ``tensorboard`` package: ``pip install 'sam-diagnostics[hf]'`` or ``pip install
tensorboard``) and :class:`CallbackSink` (any ``fn(scalars, step)``, e.g. a Lightning or
``transformers.Trainer`` logger). :func:`as_sinks` turns what a user passes (a log directory, a
callable, a sink, a list of them) into sinks, and :func:`log_record` sends one record to them.

This module reads datasets only; it never imports the rest of the package.

Examples
--------
>>> import numpy as np, xarray as xr
>>> ds = xr.Dataset(
...     {"logit_scale": (("view", "example"), [[0.2, 0.8], [0.3, 1.6]]),
...      "test_accuracy": ((), 0.75)},
...     coords={"view": ["sgd", "sam"], "example": [0, 1],
...             "is_noisy": ("example", [False, True])})
>>> s = live_summary(ds)
>>> round(s["logit_scale_ratio/noisy"], 3), s["accuracy/test"]
(2.0, 0.75)
>>> seen = []
>>> _ = log_record(ds, [lambda scalars, step: seen.append((step, len(scalars)))], step=3)
>>> seen[0][0]
3
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from os import PathLike
from typing import Any, Protocol

import numpy as np
import xarray as xr

__all__ = [
    "CallbackSink",
    "Sink",
    "TensorBoardSink",
    "as_sinks",
    "close_sinks",
    "live_summary",
    "log_record",
]

#: Curve variable -> live scalar name.
CURVE_NAMES: dict[str, str] = {
    "train_accuracy": "accuracy/train",
    "clean_train_accuracy": "accuracy/clean_train",
    "noisy_train_accuracy": "accuracy/noisy_train",
    "test_accuracy": "accuracy/test",
    "val_accuracy": "accuracy/val",
    "train_loss": "loss/train",
    "test_loss": "loss/test",
    "batch_loss": "loss/batch",
}

#: Per-example variables summarized per subset and view, with their SAM/SGD ratio.
VIEW_VARIABLES: tuple[str, ...] = ("logit_scale", "jacobian_norm")


def _one_step(ds: xr.Dataset) -> xr.Dataset:
    if "step" in ds.dims:
        if ds.sizes["step"] != 1:
            raise ValueError(f"live_summary takes one record (step of size 1), got "
                             f"{ds.sizes['step']} steps; select one with ds.isel(step=-1)")
        ds = ds.isel(step=0)
    if "run" in ds.dims:
        raise ValueError("live_summary takes one run; select one with ds.isel(run=i)")
    return ds


def _float(value: Any) -> float:
    try:
        return float(np.asarray(value, dtype=float))
    except (TypeError, ValueError):
        return math.nan


def _subsets(ds: xr.Dataset) -> dict[str, np.ndarray | None]:
    if "is_noisy" not in ds.coords and "is_noisy" not in ds.data_vars:
        return {"all": None}
    noisy = np.asarray(ds["is_noisy"].values, dtype=bool)
    return {"clean": ~noisy, "noisy": noisy}


def _mean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def live_summary(ds: xr.Dataset) -> dict[str, float]:
    """Condense one record into a flat dict of scalars (names in the module docstring).

    Parameters
    ----------
    ds : xarray.Dataset
        One record: a dataset with ``step`` of size 1 (what ``Recorder.record()`` returns,
        or ``open_run(path).isel(step=[-1])``), or one without ``step`` (a ``Probe``
        measurement). Variables it lacks are skipped.

    Returns
    -------
    dict of str to float
        Missing or undefined values (e.g. no noisy example in the probe set) are NaN; a
        ratio whose SGD-view mean is 0 is NaN.

    Examples
    --------
    >>> import xarray as xr
    >>> ds = xr.Dataset({"jacobian_norm": (("view", "example"), [[1.0, 3.0], [2.0, 6.0]])},
    ...                 coords={"view": ["sgd", "sam"]})
    >>> live_summary(ds)
    {'jacobian_norm/all_sgd': 2.0, 'jacobian_norm/all_sam': 4.0, 'jacobian_norm_ratio/all': 2.0}
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"expected an xarray.Dataset, got {type(ds).__name__}")
    ds = _one_step(ds)
    out: dict[str, float] = {}
    subsets = _subsets(ds)
    views = [str(v) for v in ds["view"].values] if "view" in ds.coords else []
    for var in VIEW_VARIABLES:
        if var not in ds.data_vars:
            continue
        da = ds[var]
        for subset, mask in subsets.items():
            means = {}
            for view in (views or ["sgd"]):
                sel = da.sel(view=view) if "view" in da.dims else da
                values = np.asarray(sel.values, dtype=float).reshape(-1)
                if mask is not None:
                    values = values[mask]
                means[view] = _mean(values)
                out[f"{var}/{subset}_{view}"] = means[view]
            if "sgd" in means and "sam" in means:
                ratio = means["sam"] / means["sgd"] if means["sgd"] else math.nan
                out[f"{var}_ratio/{subset}"] = ratio
    if "activation_norm" in ds.data_vars:
        da = ds["activation_norm"]
        if "view" in da.dims:
            da = da.sel(view="sgd")
        for layer in (da["layer"].values if "layer" in da.dims else [None]):
            sel = da.sel(layer=layer) if layer is not None else da
            name = "input" if layer is None else str(layer)
            out[f"activation_norm/{name}"] = _mean(np.asarray(sel.values, float).reshape(-1))
    if "last_layer_weight_norm" in ds.data_vars:
        out["weight_norm/last_layer"] = _float(ds["last_layer_weight_norm"].values)
    if "weight_norm" in ds.data_vars and "module" in ds["weight_norm"].dims:
        for module, value in zip(ds["module"].values, ds["weight_norm"].values):
            out[f"weight_norm/{module or '(root)'}"] = _float(value)
    for var, name in CURVE_NAMES.items():
        if var in ds.data_vars:
            out[name] = _float(ds[var].values)
    return out


# --------------------------------------------------------------------------------------------
# Sinks
# --------------------------------------------------------------------------------------------


class Sink(Protocol):
    """Anything with ``log(scalars, step)`` (and optionally ``flush()`` / ``close()``)."""

    def log(self, scalars: Mapping[str, float], step: int) -> None: ...


class CallbackSink:
    """Send the scalars to ``fn(scalars, step)`` (a framework's logger, a list, W&B...).

    Parameters
    ----------
    fn : callable
        Called as ``fn(dict(scalars), step)``.
    prefix : str
        Prepended to every name (e.g. ``"sd/"`` to group them in the host's logger).
    finite_only : bool
        Drop NaN/Inf values (many loggers reject them).

    Examples
    --------
    >>> seen = {}
    >>> CallbackSink(lambda s, step: seen.update(s), prefix="sd/").log({"a": 1.0}, step=0)
    >>> seen
    {'sd/a': 1.0}
    """

    def __init__(self, fn: Callable[[dict[str, float], int], Any], *, prefix: str = "",
                 finite_only: bool = False):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn, self.prefix, self.finite_only = fn, prefix, finite_only

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        out = {f"{self.prefix}{k}": float(v) for k, v in scalars.items()
               if not self.finite_only or math.isfinite(v)}
        if out:
            self.fn(out, int(step))


class TensorBoardSink:
    """Write the scalars to a TensorBoard event file (``torch.utils.tensorboard``).

    Parameters
    ----------
    log_dir : path or SummaryWriter
        A directory for a new ``SummaryWriter``, or a writer to share (then not closed here).
    prefix : str
        Prepended to every tag (default ``"sd/"``, so the tags group as ``sd/logit_scale/...``).

    Examples
    --------
    ::

        sink = TensorBoardSink("runs/sam-rho0.05")
        sink.log(live_summary(record), step=120)
        sink.close()
        # tensorboard --logdir runs
    """

    def __init__(self, log_dir: str | PathLike | Any, *, prefix: str = "sd/"):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("TensorBoardSink needs tensorboard: pip install tensorboard "
                              "(or 'sam-diagnostics[hf]')") from err
        if isinstance(log_dir, (str, PathLike)):
            self.writer = SummaryWriter(log_dir=str(log_dir))
            self._owned = True
        else:
            self.writer = log_dir
            self._owned = False
        self.prefix = prefix

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for name, value in scalars.items():
            if math.isfinite(value):  # TensorBoard draws NaN as gaps at best
                self.writer.add_scalar(f"{self.prefix}{name}", float(value), int(step))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self._owned:
            self.writer.close()
        else:
            self.writer.flush()


def as_sinks(live: Any) -> list[Sink]:
    """Normalize a ``live=`` argument into a list of sinks.

    ``None`` -> ``[]``; a path -> ``[TensorBoardSink(path)]``; an object with ``log`` -> itself;
    another callable -> ``CallbackSink(fn)``; a list/tuple -> each of its items.

    Examples
    --------
    >>> as_sinks(None)
    []
    >>> type(as_sinks(print)[0]).__name__
    'CallbackSink'
    """
    if live is None:
        return []
    if isinstance(live, (str, PathLike)):
        return [TensorBoardSink(live)]
    if hasattr(live, "log") and callable(live.log):
        return [live]
    if callable(live):
        return [CallbackSink(live)]
    if isinstance(live, Iterable):
        return [s for item in live for s in as_sinks(item)]
    raise TypeError(f"live must be a log directory, a callable, a sink or a list of them, got "
                    f"{type(live).__name__}")


def log_record(ds: xr.Dataset, sinks: Any, step: int | None = None) -> dict[str, float]:
    """Summarize one record with :func:`live_summary` and send it to every sink.

    ``step`` defaults to the record's ``step`` coordinate (0 without one). A sink that raises
    is reported with a warning and does not stop training. Returns the scalars.
    """
    scalars = live_summary(ds)
    if step is None:
        step = int(np.asarray(ds["step"].values).reshape(-1)[0]) if "step" in ds.coords else 0
    for sink in as_sinks(sinks) if not isinstance(sinks, list) else sinks:
        sink = sink if hasattr(sink, "log") else CallbackSink(sink)
        try:
            sink.log(scalars, step)
        except Exception as err:  # noqa: BLE001 - a logger must never kill the run
            warnings.warn(f"live sink {type(sink).__name__} failed: {err!r}", RuntimeWarning,
                          stacklevel=2)
    return scalars


def close_sinks(sinks: Iterable[Any]) -> None:
    """Flush and close the sinks that can be (e.g. a :class:`TensorBoardSink`'s writer)."""
    for sink in sinks:
        close = getattr(sink, "close", None) or getattr(sink, "flush", None)
        if callable(close):
            close()

"""Summaries of stored runs: best and final accuracies per run, mean ± std over seeds."""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401 - its exit hook must precede ours
import math
from collections.abc import Iterable
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .store import CONFIG_KEYS, CURVES, _run_name, find_runs, open_run

__all__ = ["summary_table", "group_summary", "GROUP_KEYS"]

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


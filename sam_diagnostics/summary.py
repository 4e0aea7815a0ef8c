"""Summaries of stored runs: best and final accuracies per run, mean ± std over seeds.

:func:`summary_table` and :func:`group_summary` give tables (accuracies as fractions in
[0, 1]); :func:`format_summary` is the text ``sam-diagnostics summary`` prints (percent).

Examples
--------
>>> from sam_diagnostics.summary import format_summary, summary_table
>>> print(format_summary(summary_table("runs/")))  # doctest: +SKIP
"""

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

from .runs import find_runs, open_run, run_label
from .schema import CONFIG_KEYS, CURVES

__all__ = ["summary_table", "group_summary", "format_summary", "GROUP_KEYS"]

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

    Examples
    --------
    >>> table = summary_table("runs/")  # doctest: +SKIP
    >>> table[["run", "best_test_acc", "best_epoch"]]  # doctest: +SKIP
    """
    rows = []
    if isinstance(runs, xr.Dataset):
        if "run" in runs.dims:
            # the curves only, read at once (open_runs: lazily; per-example data never read)
            runs = runs[[c for c in CURVES if c in runs.data_vars]].compute()
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
            ds = open_run(p, load=False, warn=False)
            present = [c for c in CURVES if c in ds.data_vars]
            small = ds[present].load()  # the curves only: per-example data stay on disk
            small.attrs = dict(ds.attrs)
            ds.close()
            if "run" in small.dims:  # a file of merged runs
                rows.extend(summary_table(small).to_dict("records"))
            else:
                rows.append({"run": run_label(p), **_summarize_one(small)})
    return pd.DataFrame(rows)


def group_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of each configuration of :func:`summary_table`.

    Grouped by (dataset, model, noise_rate, optimizer, m, rho); columns ``n_seeds`` and
    ``<metric>_mean`` / ``<metric>_std`` (std with ``ddof=1``, NaN for one seed).

    Examples
    --------
    >>> group_summary(summary_table("runs/"))["best_test_acc_mean"]  # doctest: +SKIP
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



# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _num(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:g}" if isinstance(x, (int, float)) else str(x)


def _pm(mean: float, std: float, fmt) -> str:
    if isinstance(mean, float) and math.isnan(mean):
        return "-"
    if isinstance(std, float) and math.isnan(std):
        return fmt(mean)
    return f"{fmt(mean)} ± {fmt(std)}"


def format_summary(table: pd.DataFrame) -> str:
    """The text of ``sam-diagnostics summary``: per run, then mean ± std over seeds.

    Accuracies are printed in percent. ``table`` is :func:`summary_table`'s result.

    Examples
    --------
    >>> print(format_summary(summary_table("run.zarr")))  # doctest: +SKIP
    Per run (accuracies in %; ...
    """
    has_val = "test_acc_at_best_val" in table
    rows = pd.DataFrame({
        "run": table["run"],
        "optimizer": table["optimizer"].map(_num),
        "rho": table["rho"].map(_num),
        "m": table["m"].map(_num),
        "seed": table["seed"].map(_num),
        "best test %": table["best_test_acc"].map(_pct),
        "best epoch": table["best_epoch"].map(_num),
        "final test %": table["final_test_acc"].map(_pct),
        "clean train % @best": table["clean_train_acc_at_best"].map(_pct),
        "noisy train % @best": table["noisy_train_acc_at_best"].map(_pct),
        **({"test % @best val": table["test_acc_at_best_val"].map(_pct)} if has_val else {}),
        "epochs": table["epochs_recorded"].map(_num),
        "done": table["complete"].map(lambda c: "yes" if c else "no"),
    })
    parts = ["Per run (accuracies in %; noisy train accuracy is against the observed, noisy "
             "labels):", rows.to_string(index=False)]
    groups = group_summary(table)
    if len(groups):
        out = pd.DataFrame({k: groups[k].map(_num) for k in
                            ("dataset", "model", "noise_rate", "optimizer", "m", "rho")
                            if k in groups})
        out = out.rename(columns={"noise_rate": "noise"})
        out["seeds"] = groups["n_seeds"]
        for col, label, fmt in (("best_test_acc", "best test %", _pct),
                                ("best_epoch", "best epoch", _num),
                                ("final_test_acc", "final test %", _pct),
                                ("clean_train_acc_at_best", "clean train % @best", _pct),
                                ("noisy_train_acc_at_best", "noisy train % @best", _pct),
                                ("test_acc_at_best_val", "test % @best val", _pct)):
            if f"{col}_mean" in groups:
                out[label] = [_pm(a, b, fmt) for a, b in
                              zip(groups[f"{col}_mean"], groups[f"{col}_std"])]
        parts += ["", "Mean ± std over seeds:", out.to_string(index=False)]
    return "\n".join(parts)

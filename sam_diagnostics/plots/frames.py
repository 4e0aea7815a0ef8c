"""From one or many stored runs to tidy (long-form) frames, averaged over examples first."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from .style import (
    _KEY_SYMBOLS,
    CONFIG_KEYS,
    MissingVariableError,
    _fmt_value,
    _method_rank,
    _shades,
    method_color,
    method_label,
)


def _as_runs(ds: xr.Dataset) -> xr.Dataset:
    """Return ``ds`` with a ``run`` dimension; a single run's attrs become ``run`` coords."""
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"expected an xarray.Dataset, got {type(ds).__name__}")
    if "run" in ds.dims:
        return ds
    out = ds.expand_dims("run").assign_coords(run=[0])
    for key in ("optimizer", "seed", *CONFIG_KEYS):
        if key in ds.attrs and key not in out.coords:
            value = ds.attrs[key]
            if np.ndim(value) == 0:
                out = out.assign_coords({key: ("run", [value])})
    return out


def run_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per run: method, display label, colour, seed and configuration.

    Parameters
    ----------
    ds : xarray.Dataset
        A single run (configuration in ``attrs``) or runs concatenated along ``run`` (the
        configuration as ``run`` coordinates ``optimizer``, ``seed``, ``rho``, ...).

    Returns
    -------
    pandas.DataFrame
        Columns ``run`` (position along ``run``), ``method``, ``method_label``, ``color``,
        ``seed`` and the :data:`CONFIG_KEYS` that are present. ``method_label`` identifies a
        configuration: keys that vary among the runs of one method (e.g. ``ρ`` in a sweep) are
        appended to its label, and such variants get shades of the method's colour. Rows are
        sorted in :data:`METHOD_ORDER`.

    Examples
    --------
    >>> run_table(ds)[["method", "method_label", "seed"]]  # doctest: +SKIP
    """
    runs = _as_runs(ds)
    n = runs.sizes["run"]

    def column(name: str) -> list | None:
        if name in runs.coords and runs[name].dims == ("run",):
            return [v.item() if hasattr(v, "item") else v for v in runs[name].values]
        return None

    table = pd.DataFrame({"run": np.arange(n)})
    methods = column("optimizer")
    table["method"] = [str(v).lower() for v in methods] if methods else "unknown"
    seeds = column("seed")
    table["seed"] = seeds if seeds is not None else np.nan
    keys = []
    for key in CONFIG_KEYS:
        values = column(key)
        if values is not None:
            table[key] = values
            keys.append(key)

    labels = []
    for _, row in table.iterrows():
        same = table[table["method"] == row["method"]]
        varying = [k for k in keys if same[k].astype(str).nunique() > 1]
        label = method_label(row["method"], row.get("m"))
        if varying:
            label += (
                " ("
                + ", ".join(f"{_KEY_SYMBOLS.get(k, k)}={_fmt_value(k, row[k])}" for k in varying)
                + ")"
            )
        labels.append(label)
    table["method_label"] = labels

    table["_rank"] = table["method"].map(_method_rank)
    sort_keys = ["_rank", "method", *[k for k in keys if table[k].notna().any()], "run"]
    table = table.sort_values(sort_keys, kind="stable", key=_sortable).drop(columns="_rank")
    colors: dict[str, str] = {}
    for method, group in table.groupby("method", sort=False):
        variants = list(dict.fromkeys(group["method_label"]))
        colors.update(zip(variants, _shades(method_color(method), len(variants))))
    table["color"] = table["method_label"].map(colors)
    cols = ["run", "method", "method_label", "color", "seed", *keys]
    return table[cols].reset_index(drop=True)


def _sortable(col: pd.Series) -> pd.Series:
    if col.dtype == object:
        return col.astype(str)
    return col


def _hue(table: pd.DataFrame, present: Iterable[str] | None = None) -> tuple[list[str], dict]:
    """Hue order (METHOD_ORDER, then configuration) and palette of the labels present."""
    order = list(dict.fromkeys(table["method_label"]))
    if present is not None:
        present = set(present)
        order = [label for label in order if label in present]
    palette = dict(zip(table["method_label"], table["color"]))
    return order, {label: palette[label] for label in order}


def _subset_masks(run: xr.Dataset, by_noise: bool) -> dict[str, xr.DataArray | None]:
    if not by_noise or "is_noisy" not in run.coords and "is_noisy" not in run.data_vars:
        return {"all": None}
    noisy = run["is_noisy"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flag = noisy.astype(float)
    return {"clean": flag == 0, "noisy": flag == 1}


def _epochs(run: xr.Dataset) -> pd.Series | None:
    if "epoch" not in run.coords and "epoch" not in run.data_vars:
        return None
    epoch = run["epoch"]
    if epoch.dims != ("step",):
        return None
    return pd.Series(np.asarray(epoch.values, dtype=float), index=run["step"].values)


def _frame(da: xr.DataArray) -> pd.DataFrame:
    da = da.reset_coords(drop=True).rename("value")
    if da.ndim == 0:
        return pd.DataFrame({"value": [float(da.values)]})
    return da.to_series().reset_index()


def to_long(
    ds: xr.Dataset,
    variables: str | Sequence[str],
    *,
    by_noise: bool = True,
) -> pd.DataFrame:
    """Tidy frame of stored variables, averaged over probe examples first.

    Per-example variables are averaged over the examples of each subset (clean / noisy when
    ``by_noise``, else all) separately for every run, step, view and layer/module; per-step
    variables (training curves, weight norms) are passed through. Seeds are separate runs and
    stay separate rows, so seaborn can draw mean ± sd across seeds. Missing variables are
    skipped; NaN values (steps where a quantity was not measured) are dropped.

    Parameters
    ----------
    ds : xarray.Dataset
        One run, or runs concatenated along ``run`` (see :func:`run_table`).
    variables : str or sequence of str
        Data variables to include.
    by_noise : bool, default True
        Split per-example means into clean and noisy probe examples (needs ``is_noisy``).

    Returns
    -------
    pandas.DataFrame
        One row per (run, step, view, subset[, layer][, module], variable) with columns
        ``run, method, method_label, seed, <config keys>, step, epoch, view, subset,
        is_noisy, [layer], [module], variable, value``. ``view`` is missing (NaN) for
        variables without a view dimension, ``subset`` is ``"all"`` and ``is_noisy`` is
        ``<NA>`` for variables without an example dimension.

    Raises
    ------
    MissingVariableError
        If none of ``variables`` is in ``ds``.

    Examples
    --------
    >>> df = to_long(ds, ["logit_scale", "test_accuracy"])  # doctest: +SKIP
    >>> df.query("variable == 'logit_scale' and view == 'sgd'").groupby(
    ...     ["method_label", "subset"])["value"].mean()  # doctest: +SKIP
    """
    if isinstance(variables, str):
        variables = [variables]
    runs = _as_runs(ds)
    present = [v for v in variables if v in runs.data_vars]
    if not present:
        raise MissingVariableError(
            f"none of {list(variables)} is in the dataset (data variables: "
            f"{sorted(map(str, runs.data_vars))})"
        )
    table = run_table(runs)
    frames = []
    for i in range(runs.sizes["run"]):
        run = runs.isel(run=i)
        masks = _subset_masks(run, by_noise)
        epochs = _epochs(run)
        for var in present:
            da = run[var]
            if "example" in da.dims:
                parts = [
                    (s, da.mean("example") if mask is None else da.where(mask).mean("example"))
                    for s, mask in masks.items()
                ]
            else:
                parts = [("all", da)]
            for subset, reduced in parts:
                frame = _frame(reduced).dropna(subset=["value"])
                if frame.empty:
                    continue
                frame["run"] = i
                frame["variable"] = var
                frame["subset"] = subset
                if "step" in frame:
                    frame["epoch"] = frame["step"].map(epochs) if epochs is not None else np.nan
                frames.append(frame)
    base = ["run", "step", "epoch", "view", "subset", "variable", "value"]
    if not frames:
        out = pd.DataFrame(columns=base)
    else:
        out = pd.concat(frames, ignore_index=True)
    for col in ("step", "epoch", "view"):
        if col not in out:
            out[col] = np.nan
    out["is_noisy"] = out["subset"].map({"clean": False, "noisy": True}).astype("boolean")
    out["value"] = out["value"].astype(float)
    out = table.drop(columns="color").merge(out, on="run", how="right")
    extra = [c for c in ("layer", "module") if c in out]
    head = [c for c in table.columns if c != "color"]
    cols = [*head, "step", "epoch", "view", "subset", "is_noisy", *extra, "variable", "value"]
    return out[cols]


def _xcol(df: pd.DataFrame) -> str:
    return "epoch" if "epoch" in df and df["epoch"].notna().all() else "step"


def _view(df: pd.DataFrame, view: str) -> pd.DataFrame:
    """Rows of one view; rows without a view dimension count as the SGD view (at w)."""
    if view == "sgd":
        return df[(df["view"] == "sgd") | df["view"].isna()]
    return df[df["view"] == view]


def _view_ratio(df: pd.DataFrame) -> pd.DataFrame:
    """SAM-view / SGD-view ratio of the (already example-averaged) values."""
    keys = ["run", "variable", "step", "subset"]
    keys += [c for c in ("layer", "module") if c in df and df[c].notna().any()]
    sgd = df[df["view"] == "sgd"]
    sam = df[df["view"] == "sam"][[*keys, "value"]]
    merged = sgd.merge(sam, on=keys, suffixes=("", "_sam"))
    merged["value"] = merged["value_sam"] / merged["value"]
    return merged.drop(columns="value_sam").assign(view="sam/sgd")


def _require(df: pd.DataFrame, what: str) -> None:
    if df.empty:
        raise MissingVariableError(f"the dataset has no finite values for {what}")

"""Figures from stored diagnostics datasets.

This module reads the xarray datasets described in SPEC section 3 (one run, or several runs
concatenated along a ``run`` dimension) and answers one question per figure function:

- :func:`plot_accuracy_curves`: clean-train / noisy-train (memorization) / test accuracy,
  with the early-stopping peak of every method marked;
- :func:`plot_logit_scale`: mean logit scale ``‖δ_i‖₂`` of clean vs noisy probe examples and
  its SAM-view / SGD-view ratio (finding 1 of the paper);
- :func:`plot_norms`: Jacobian norm, penultimate activation norm, last-layer weight norm and
  the Jacobian SAM/SGD ratio;
- :func:`plot_upweighting`: per-example logit-scale ratio SAM/SGD against the margin;
- :func:`plot_standard`: all of the above that the data supports, saved to disk.

All figures take *tidy* frames built by :func:`to_long`, which averages over probe examples
first (per run, step, view, clean/noisy subset and layer), so seaborn never sees millions of
rows; seeds stay separate rows and are drawn as mean ± sd bands.

Figures are built as :class:`matplotlib.figure.Figure` objects, independent of pyplot's
figure manager and of the user's backend; :func:`save_figure` writes PNG and PDF files.
This module never imports torch nor the rest of the package: it reads stored data only.
"""

from __future__ import annotations

import colorsys
import contextlib
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = [
    "CONFIG_KEYS",
    "METHOD_LABELS",
    "METHOD_ORDER",
    "METHOD_PALETTE",
    "MissingVariableError",
    "SUBSET_PALETTE",
    "method_color",
    "method_label",
    "plot_accuracy_curves",
    "plot_logit_scale",
    "plot_norms",
    "plot_standard",
    "plot_upweighting",
    "run_table",
    "save_figure",
    "to_long",
]

# --------------------------------------------------------------------------------------------
# Names, labels and colours shared by every figure
# --------------------------------------------------------------------------------------------

#: Order in which methods appear in every legend and hue mapping.
METHOD_ORDER: tuple[str, ...] = ("sgd", "sam", "lsam", "jsam", "regsgd")

#: Display names; SAM with ``m == 1`` is shown as "1-SAM" (see :func:`method_label`).
METHOD_LABELS: dict[str, str] = {
    "sgd": "SGD",
    "sam": "SAM",
    "lsam": "L-SAM",
    "jsam": "J-SAM",
    "regsgd": "reg. SGD",
}

#: One colour per method, used by every figure (Okabe–Ito, colour-blind safe).
METHOD_PALETTE: dict[str, str] = {
    "sgd": "#000000",  # black: the baseline
    "sam": "#0072b2",  # blue
    "lsam": "#e69f00",  # orange
    "jsam": "#009e73",  # bluish green
    "regsgd": "#cc79a7",  # reddish purple
}

#: Colours of clean vs noisy probe examples where they are the hue (not used for methods).
SUBSET_PALETTE: dict[str, str] = {"clean": "#56b4e9", "noisy": "#d55e00", "all": "#666666"}

#: Line styles of clean vs noisy probe examples where the method is the hue.
SUBSET_DASHES: dict[str, str | tuple[float, float]] = {"clean": "", "noisy": (4, 2), "all": ""}

#: Run attributes that distinguish configurations (besides ``optimizer`` and ``seed``). When
#: one of them varies among the runs of a method, it is appended to that method's label.
CONFIG_KEYS: tuple[str, ...] = ("dataset", "model", "noise_rate", "rho", "m", "lr")

_SUBSET_ORDER = ("clean", "noisy", "all")
_EXTRA_COLORS = ("#d55e00", "#56b4e9", "#f0e442", "#999999", "#882255", "#44aa99")
_KEY_SYMBOLS = {"rho": "ρ", "noise_rate": "noise", "lr": "lr", "m": "m"}


class MissingVariableError(ValueError):
    """None of the variables a figure (or :func:`to_long`) needs is in the dataset."""


def method_label(method: str, m: object = None) -> str:
    """Display name of an optimizer variant.

    Parameters
    ----------
    method : str
        Optimizer name as stored in the ``optimizer`` attribute ("sgd", "sam", ...).
    m : int, optional
        Examples per perturbation group. SAM with ``m == 1`` is the paper's "1-SAM".

    Returns
    -------
    str

    Examples
    --------
    >>> method_label("sam", m=1), method_label("sam", m=128), method_label("jsam", m=1)
    ('1-SAM', 'SAM', 'J-SAM')
    """
    key = str(method).lower()
    label = METHOD_LABELS.get(key, str(method))
    if key == "sam" and _is_one(m):
        label = "1-SAM"
    return label


def method_color(method: str) -> str:
    """Colour of a method, the same in every figure (unknown names get a stable extra colour).

    Examples
    --------
    >>> method_color("sam") == METHOD_PALETTE["sam"]
    True
    """
    key = str(method).lower()
    if key in METHOD_PALETTE:
        return METHOD_PALETTE[key]
    return _EXTRA_COLORS[sum(key.encode()) % len(_EXTRA_COLORS)]


def _is_one(m: object) -> bool:
    try:
        return float(m) == 1.0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def _fmt_value(key: str, value: object) -> str:
    if key == "noise_rate":
        with contextlib.suppress(TypeError, ValueError):
            return f"{float(value):.0%}"  # type: ignore[arg-type]
    if isinstance(value, (float, np.floating)):
        return "–" if math.isnan(value) else f"{value:g}"
    return str(value)


def _shades(color: str, n: int) -> list[str]:
    """``n`` shades of one hue (dark to light) for several configurations of one method."""
    if n == 1:
        return [mcolors.to_hex(color)]
    h, lightness, s = colorsys.rgb_to_hls(*mcolors.to_rgb(color))
    lo, hi = max(0.0, lightness - 0.2), min(0.8, lightness + 0.35)
    return [mcolors.to_hex(colorsys.hls_to_rgb(h, li, s)) for li in np.linspace(lo, hi, n)]


# --------------------------------------------------------------------------------------------
# From one or many stored runs to tidy frames
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Figure helpers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _style():
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.8):
        yield


def _figure(
    n_panels: int, *, ncols: int | None = None, panel=(4.0, 3.1), sharey: bool = False
) -> tuple[Figure, list]:
    ncols = min(n_panels, ncols or n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel[0] * ncols + 1.6, panel[1] * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def _xcol(df: pd.DataFrame) -> str:
    return "epoch" if "epoch" in df and df["epoch"].notna().all() else "step"


def _context(table: pd.DataFrame, pooled: bool = False) -> str:
    """Short description of what is shared by all runs, e.g. 'cifar10 · resnet18 · 30% noise'."""
    parts = []
    for key in ("dataset", "model", "noise_rate"):
        if key in table and table[key].astype(str).nunique() == 1:
            value = table[key].iloc[0]
            if isinstance(value, float) and math.isnan(value):
                continue
            parts.append(
                f"{_fmt_value(key, value)} label noise" if key == "noise_rate" else str(value)
            )
    seeds = table.groupby("method_label").size().max() if len(table) else 1
    if seeds > 1:
        parts.append(f"{seeds} seeds pooled" if pooled else f"mean ± sd over {seeds} seeds")
    return " · ".join(parts)


def _suptitle(fig: Figure, title: str, table: pd.DataFrame, pooled: bool = False) -> None:
    context = _context(table, pooled)
    fig.suptitle(f"{title}\n{context}" if context else title, fontsize=11)


def _legend(
    fig: Figure,
    order: Sequence[str],
    palette: dict,
    subsets: Sequence[str] = (),
    extra: Sequence[Line2D] = (),
) -> None:
    handles = [Line2D([], [], color=palette[lab], lw=2, label=lab) for lab in order]
    if len(subsets) > 1 or (subsets and subsets[0] != "all"):
        handles.append(Line2D([], [], linestyle="none", label=""))
        handles.append(Line2D([], [], linestyle="none", label="probe examples:"))
        for subset in subsets:
            dash = SUBSET_DASHES[subset]
            style = (0, dash) if dash else "-"
            handles.append(Line2D([], [], color="0.3", lw=1.6, linestyle=style, label=subset))
    if extra:
        handles.append(Line2D([], [], linestyle="none", label=""))
        handles.extend(extra)
    fig.legend(
        handles=handles, loc="outside right center", frameon=False, fontsize=9, handlelength=2.6
    )


def _lines(ax, df: pd.DataFrame, order, palette, *, style: bool = True) -> list[str]:
    """Mean ± sd (across seeds) lines, hue = method, dashes = clean/noisy subset."""
    x = _xcol(df)
    subsets = [s for s in _SUBSET_ORDER if s in set(df["subset"])] if style else []
    sns.lineplot(
        data=df,
        x=x,
        y="value",
        hue="method_label",
        hue_order=[h for h in order if h in set(df["method_label"])],
        palette=palette,
        style="subset" if subsets else None,
        style_order=subsets or None,
        dashes={s: SUBSET_DASHES[s] for s in subsets} if subsets else True,
        estimator="mean",
        errorbar="sd",
        err_kws={"alpha": 0.15, "linewidth": 0},
        linewidth=1.5,
        legend=False,
        ax=ax,
    )
    ax.set_xlabel(x)
    return subsets


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


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

_ACCURACY_PANELS = (
    ("clean_train_accuracy", "clean training examples"),
    ("noisy_train_accuracy", "noisy training examples\n(vs observed labels = memorization)"),
    ("test_accuracy", "test set"),
)


def plot_accuracy_curves(ds: xr.Dataset, *, mark_peak: bool = True) -> Figure:
    """Clean-train, noisy-train (memorization) and test accuracy over training.

    One panel per available curve, hue = method (mean ± sd over seeds). The early-stopping
    point of each method, the epoch of the maximum of its seed-averaged test accuracy, is
    marked with a star in every panel and annotated with the accuracy in the test panel.

    Parameters
    ----------
    ds : xarray.Dataset
        One run or runs concatenated along ``run``, with any of ``clean_train_accuracy``,
        ``noisy_train_accuracy``, ``test_accuracy`` (fractions in [0, 1]; NaN where not
        measured).
    mark_peak : bool, default True
        Mark and annotate the best (early-stopped) test accuracy of every method.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    MissingVariableError
        If none of the three accuracy curves is present.

    Examples
    --------
    >>> fig = plot_accuracy_curves(ds)  # doctest: +SKIP
    >>> save_figure(fig, "figures", "accuracy")  # doctest: +SKIP
    """
    names = [name for name, _ in _ACCURACY_PANELS]
    df = to_long(ds, names, by_noise=False)
    _require(df, "the accuracy curves")
    table = run_table(ds)
    if df["value"].max() <= 1.0 + 1e-9:  # stored as fractions (the schema); show percent
        df["value"] = df["value"] * 100.0
    order, palette = _hue(table, df["method_label"])
    panels = [(n, t) for n, t in _ACCURACY_PANELS if (df["variable"] == n).any()]
    x = _xcol(df)
    peaks: dict[str, tuple[float, float]] = {}
    test = df[df["variable"] == "test_accuracy"]
    if mark_peak and not test.empty:
        mean = test.groupby(["method_label", x])["value"].mean()
        for label in order:
            if label in mean.index.get_level_values(0):
                curve = mean.loc[label]
                peaks[label] = (float(curve.idxmax()), float(curve.max()))
    with _style():
        fig, axes = _figure(len(panels))
        for ax, (name, title) in zip(axes, panels):
            sub = df[df["variable"] == name]
            _lines(ax, sub, order, palette, style=False)
            ax.set_title(title)
            ax.set_ylabel("accuracy (%)")
            if peaks:
                curves = sub.groupby(["method_label", x])["value"].mean()
                for label, (epoch, _best) in peaks.items():
                    if (label, epoch) in curves.index:
                        ax.plot(
                            epoch,
                            curves.loc[(label, epoch)],
                            marker="*",
                            ms=11,
                            color=palette[label],
                            mec="white",
                            mew=0.8,
                            zorder=5,
                            linestyle="none",
                        )
                if name == "test_accuracy":
                    _annotate_peaks(ax, peaks, palette, x)
        star = Line2D(
            [],
            [],
            marker="*",
            ms=11,
            color="0.3",
            mec="white",
            linestyle="none",
            label="best test acc.\n(early stop)",
        )
        _legend(fig, order, palette, extra=[star] if peaks else ())
        _suptitle(fig, "Accuracy over training", table)
    return fig


def _annotate_peaks(ax, peaks: dict[str, tuple[float, float]], palette: dict, x: str) -> None:
    """Label each peak with its value, nudging labels apart vertically so they never overlap."""
    lo, hi = ax.get_ylim()
    gap = 0.075 * (hi - lo)
    x0, x1 = ax.get_xlim()
    y_text = -math.inf
    unit = "ep" if x == "epoch" else "step"
    # from the lowest peak up: each label at its peak's height or just above the previous one,
    # so labels sit in the empty space above the curves (a peak is its curve's maximum)
    for label, (epoch, best) in sorted(peaks.items(), key=lambda kv: kv[1][1]):
        y_text = max(best + 0.01 * (hi - lo), y_text + gap)
        ax.annotate(
            f"{best:.1f}% ({unit} {epoch:g})",
            xy=(epoch, best),
            xytext=(epoch + 0.02 * (x1 - x0), y_text),
            fontsize=7.5,
            color=palette[label],
            va="bottom",
            ha="left",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75},
            arrowprops={
                "arrowstyle": "-",
                "color": palette[label],
                "lw": 0.6,
                "shrinkA": 0,
                "shrinkB": 4,
            },
            zorder=6,
        )
    ax.set_ylim(lo, max(hi, y_text + 1.3 * gap))


def plot_logit_scale(ds: xr.Dataset) -> Figure:
    """Logit scale of clean vs noisy probe examples, and how SAM's perturbation rescales it.

    Left: mean logit scale ``‖δ_i‖₂`` at ``w`` (SGD view) over training, hue = method,
    solid = clean, dashed = noisy probe examples. Right (when the SAM view is stored): the
    ratio of the mean logit scale at ``w + ε_i`` to that at ``w``. The paper's finding 1 is
    that this ratio is larger for clean examples early in training: SAM up-weights clean
    gradients relative to noisy ones.

    Parameters
    ----------
    ds : xarray.Dataset
        One run or runs concatenated along ``run``, with ``logit_scale`` over
        (step, view, example) and ``is_noisy(example)``.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    MissingVariableError
        If ``logit_scale`` is absent.

    Examples
    --------
    >>> fig = plot_logit_scale(ds)  # doctest: +SKIP
    """
    df = to_long(ds, ["logit_scale"])
    _require(df, "logit_scale")
    table = run_table(ds)
    sgd = _view(df, "sgd")
    ratio = _view_ratio(df)
    order, palette = _hue(table, df["method_label"])
    with _style():
        fig, axes = _figure(1 + (not ratio.empty))
        subsets = _lines(axes[0], sgd, order, palette)
        axes[0].set_title(r"mean logit scale at $w$ (SGD view)")
        axes[0].set_ylabel(r"$\Vert\delta_i\Vert_2$ (logit scale)")
        if not ratio.empty:
            _lines(axes[1], ratio, order, palette)
            axes[1].axhline(1.0, color="0.4", lw=0.8, ls=":")
            axes[1].set_title(
                "SAM up-weighting: mean logit scale\n" r"at $w + \varepsilon_i$ / at $w$"
            )
            axes[1].set_ylabel("logit-scale ratio SAM / SGD view")
        _legend(fig, order, palette, subsets)
        _suptitle(fig, "Logit scale of clean vs noisy examples", table)
    return fig


def _last_layer_rows(df: pd.DataFrame, layer_order: Sequence[str]) -> pd.DataFrame:
    """Per run, the rows of the last watched layer that has data (the penultimate activation)."""
    rank = {name: i for i, name in enumerate(layer_order)}
    last = df.groupby("run")["layer"].agg(lambda s: max(s.unique(), key=lambda v: rank.get(v, -1)))
    return df[df["layer"] == df["run"].map(last)]


def plot_norms(ds: xr.Dataset) -> Figure:
    """Jacobian, penultimate-activation and last-layer weight norms over training.

    Panels (those the data supports): mean Jacobian norm ``‖J_i‖_F`` at ``w``; mean norm of
    the last watched layer's input activation ``‖a_i‖₂`` (the penultimate activation) at
    ``w``; the last-layer weight norm ``‖V‖_F``; and the SAM-view / SGD-view ratio of the mean
    Jacobian norm. Hue = method, solid = clean, dashed = noisy probe examples. SPEC 2.3: for
    ``z = V a + b`` these are exactly the Jacobian blocks that J-SAM's implicit penalty keeps
    small (finding 3).

    Parameters
    ----------
    ds : xarray.Dataset
        One run or runs concatenated along ``run``, with any of ``jacobian_norm``,
        ``activation_norm`` (over ``layer``), ``last_layer_weight_norm``.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    MissingVariableError
        If none of the three variables is present.

    Examples
    --------
    >>> fig = plot_norms(ds)  # doctest: +SKIP
    """
    df = to_long(ds, ["jacobian_norm", "activation_norm", "last_layer_weight_norm"])
    _require(df, "the norms")
    table = run_table(ds)
    order, palette = _hue(table, df["method_label"])
    jac = df[df["variable"] == "jacobian_norm"]
    act = _view(df[df["variable"] == "activation_norm"], "sgd")
    layers: list[str] = []
    if not act.empty and "layer" in act:
        act = _last_layer_rows(act, [str(v) for v in _as_runs(ds)["layer"].values])
        layers = list(dict.fromkeys(act["layer"].astype(str)))
    weight = df[df["variable"] == "last_layer_weight_norm"]
    jac_ratio = _view_ratio(jac) if not jac.empty else jac
    panels = []
    if not jac.empty:
        panels.append(
            (_view(jac, "sgd"), r"Jacobian norm at $w$", r"$\Vert J_i\Vert_F$ (Jacobian norm)")
        )
    if not act.empty:
        where = f" (input of {', '.join(layers)})" if layers else ""
        panels.append(
            (act, f"penultimate activation at $w${where}", r"$\Vert a_i\Vert_2$ (activation norm)")
        )
    if not weight.empty:
        panels.append((weight, "last-layer weight norm", r"$\Vert V\Vert_F$ (weight norm)"))
    if not jac_ratio.empty:
        panels.append(
            (
                jac_ratio,
                r"Jacobian norm at $w + \varepsilon_i$ / at $w$",
                "Jacobian-norm ratio SAM / SGD view",
            )
        )
    with _style():
        fig, axes = _figure(len(panels), ncols=2 if len(panels) == 4 else 3)
        subsets: list[str] = []
        for ax, (sub, title, ylabel) in zip(axes, panels):
            subsets = max(subsets, _lines(ax, sub, order, palette), key=len)
            ax.set_title(title)
            ax.set_ylabel(ylabel)
            if sub["view"].eq("sam/sgd").any():  # reference line, without rescaling the axis
                ylim = ax.get_ylim()
                ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
                ax.set_ylim(ylim)
        _legend(fig, order, palette, subsets)
        _suptitle(fig, "Jacobian, activation and weight norms", table)
    return fig


def _upweighting_frame(ds: xr.Dataset, step: int | None) -> tuple[pd.DataFrame, int]:
    runs = _as_runs(ds)
    missing = [v for v in ("logit_scale", "margin") if v not in runs.data_vars]
    if missing:
        raise MissingVariableError(f"plot_upweighting needs {missing} (absent from the dataset)")
    scale = runs["logit_scale"]
    if "view" not in scale.dims or not {"sgd", "sam"} <= set(map(str, scale["view"].values)):
        raise MissingVariableError("plot_upweighting needs logit_scale in both views (sgd, sam)")
    ratio = scale.sel(view="sam") / scale.sel(view="sgd")
    margin = runs["margin"]
    if "view" in margin.dims:
        margin = margin.sel(view="sgd")
    valid = (ratio.notnull() & margin.notnull()).any("example")
    if step is None:
        steps = runs["step"].values
        every = steps[valid.all("run").values]
        some = steps[valid.any("run").values]
        if len(some) == 0:
            raise MissingVariableError("no step has logit_scale (both views) and margin")
        step = int((every if len(every) else some)[-1])
    else:
        step = int(runs["step"].sel(step=step, method="nearest"))
    table = run_table(runs)
    frames = []
    for i in range(runs.sizes["run"]):
        point = xr.Dataset(
            {
                "ratio": ratio.isel(run=i).sel(step=step).reset_coords(drop=True),
                "margin": margin.isel(run=i).sel(step=step).reset_coords(drop=True),
            }
        )
        if "is_noisy" in runs.coords or "is_noisy" in runs.data_vars:
            flag = runs["is_noisy"]
            flag = flag.isel(run=i) if "run" in flag.dims else flag
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                point["noisy"] = flag.astype(float).reset_coords(drop=True)
        frame = point.to_dataframe().reset_index().dropna(subset=["ratio", "margin"])
        if "noisy" in frame:
            frame["subset"] = frame["noisy"].map({0.0: "clean", 1.0: "noisy"}).fillna("all")
        else:
            frame["subset"] = "all"
        frame["run"] = i
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True).merge(table, on="run")
    return df, step


def plot_upweighting(
    ds: xr.Dataset,
    step: int | None = None,
    *,
    max_points: int = 1500,
    trend: bool = True,
    seed: int = 0,
) -> Figure:
    """Per-example up-weighting by SAM: logit-scale ratio SAM/SGD view against the margin.

    One panel per method (seeds pooled), one point per probe example at ``step``: x = margin
    ``z_y − max_{c≠y} z_c`` at ``w``, y = ``‖δ_i(w + ε_i)‖ / ‖δ_i(w)‖``; hue = clean / noisy.
    For a linear model the ratio increases with the margin (SPEC 2.4), so examples that are
    already fitted (early on: the clean ones) are up-weighted most. Optional trend lines show
    the mean ratio in margin quantile bins; the panel text gives the subset means.

    Parameters
    ----------
    ds : xarray.Dataset
        One run or runs concatenated along ``run``, with ``logit_scale`` in both views and
        ``margin`` (SGD view).
    step : int, optional
        Training step to show (the nearest recorded one is used). Default: the last step at
        which every run has both quantities.
    max_points : int, default 1500
        At most this many points are drawn per panel (a random subsample; means and trend
        lines use all examples).
    trend : bool, default True
        Draw the binned mean ratio per subset.
    seed : int, default 0
        Seed of the subsampling.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    MissingVariableError
        If ``logit_scale`` (both views) or ``margin`` is missing.

    Examples
    --------
    >>> fig = plot_upweighting(ds, step=500)  # doctest: +SKIP
    """
    df, step = _upweighting_frame(ds, step)
    if df.empty:
        raise MissingVariableError(f"no probe example has both views at step {step}")
    table = run_table(ds)
    order, palette = _hue(table, df["method_label"])
    subsets = [s for s in _SUBSET_ORDER if s in set(df["subset"])]
    rng = np.random.default_rng(seed)
    with _style():
        ncols = len(order) if len(order) <= 3 else math.ceil(len(order) / 2)
        fig, axes = _figure(len(order), ncols=ncols, panel=(3.6, 3.1), sharey=True)
        for i, (ax, label) in enumerate(zip(axes, order)):
            sub = df[df["method_label"] == label]
            shown = sub
            if len(sub) > max_points:
                shown = sub.iloc[np.sort(rng.choice(len(sub), max_points, replace=False))]
            sns.scatterplot(
                data=shown,
                x="margin",
                y="ratio",
                hue="subset",
                hue_order=subsets,
                palette=SUBSET_PALETTE,
                s=9,
                alpha=0.45,
                linewidth=0,
                legend=False,
                ax=ax,
            )
            if trend:
                _binned_trend(ax, sub, subsets)
            ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
            ax.axvline(0.0, color="0.6", lw=0.6, ls=":")
            means = sub.groupby("subset")["ratio"].mean()
            ax.text(
                0.03,
                0.97,
                "mean ratio\n" + "\n".join(f"{s}: {means[s]:.3f}" for s in subsets if s in means),
                transform=ax.transAxes,
                va="top",
                ha="left",
                fontsize=7.5,
                bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": "0.8", "alpha": 0.85},
            )
            ax.set_title(label, color=palette[label])
            ax.set_xlabel(r"margin $z_y - \max_{c \neq y} z_c$ at $w$")
            ax.set_ylabel(
                r"logit-scale ratio $\Vert\delta_i(w+\varepsilon_i)\Vert\,/\,\Vert\delta_i(w)\Vert$"
                if i % ncols == 0
                else ""
            )
        handles = [
            Line2D([], [], marker="o", linestyle="none", color=SUBSET_PALETTE[s], label=s)
            for s in subsets
        ]
        if trend:
            handles.append(Line2D([], [], color="0.3", lw=1.6, label="binned mean"))
        fig.legend(
            handles=handles,
            loc="outside right center",
            frameon=False,
            fontsize=9,
            title="probe examples",
            title_fontsize=9,
        )
        epoch = _epoch_of(ds, step)
        when = f"step {step}" + (f" (epoch {epoch:.3g})" if epoch is not None else "")
        _suptitle(fig, f"SAM up-weighting vs margin, {when}", table, pooled=True)
    return fig


def _binned_trend(ax, df: pd.DataFrame, subsets: Sequence[str], bins: int = 8) -> None:
    for subset in subsets:
        part = df[df["subset"] == subset]
        if len(part) < 2 * bins:
            continue
        edges = np.unique(np.quantile(part["margin"], np.linspace(0, 1, bins + 1)))
        if len(edges) < 3:
            continue
        which = pd.cut(part["margin"], edges, include_lowest=True)
        grouped = part.groupby(which, observed=True)[["margin", "ratio"]].mean()
        # a dark casing keeps the trend readable over the points of the same colour
        ax.plot(grouped["margin"], grouped["ratio"], color="0.15", lw=3.0, zorder=4)
        ax.plot(grouped["margin"], grouped["ratio"], color=SUBSET_PALETTE[subset], lw=1.8, zorder=5)


def _epoch_of(ds: xr.Dataset, step: int) -> float | None:
    if "epoch" not in ds.coords or "step" not in ds["epoch"].dims:
        return None
    value = ds["epoch"].sel(step=step)
    if "run" in value.dims:
        value = value.max("run")
    value = float(value)
    return None if math.isnan(value) else value


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_figure(
    fig: Figure,
    out_dir: str | Path,
    name: str,
    *,
    formats: Sequence[str] = ("png", "pdf"),
    dpi: int = 150,
) -> list[Path]:
    """Write ``fig`` as ``out_dir/name.png`` (``dpi``) and ``out_dir/name.pdf``, then close it.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        A figure from this module, or any matplotlib figure (pyplot-managed ones are closed).
    out_dir : str or pathlib.Path
        Created if needed.
    name : str
        File name without extension.
    formats : sequence of str, default ("png", "pdf")
    dpi : int, default 150
        Resolution of raster formats.

    Returns
    -------
    list of pathlib.Path
        The written files, in ``formats`` order.

    Examples
    --------
    >>> paths = save_figure(plot_norms(ds), "figures", "norms")  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            fig.savefig(path, dpi=dpi, bbox_inches="tight")
            paths.append(path)
    finally:
        import matplotlib.pyplot as plt  # only to release pyplot-managed figures

        plt.close(fig)
    return paths


_STANDARD = (
    ("accuracy", plot_accuracy_curves),
    ("logit_scale", plot_logit_scale),
    ("norms", plot_norms),
    ("upweighting", plot_upweighting),
)


def plot_standard(ds: xr.Dataset, out_dir: str | Path, *, prefix: str = "") -> list[Path]:
    """Render and save every standard figure the dataset supports.

    Figures whose variables are all absent are skipped (accuracy, logit_scale, norms,
    upweighting, in that order), each saved as PNG and PDF by :func:`save_figure`.

    Parameters
    ----------
    ds : xarray.Dataset
        One run or runs concatenated along ``run``.
    out_dir : str or pathlib.Path
        Directory of the figures (created if needed).
    prefix : str, default ""
        Prepended to every file name.

    Returns
    -------
    list of pathlib.Path
        The files written.

    Raises
    ------
    MissingVariableError
        If the dataset supports none of the figures.

    Examples
    --------
    >>> import xarray as xr
    >>> ds = xr.open_zarr("runs/sam_seed0.zarr")  # doctest: +SKIP
    >>> plot_standard(ds, "figures")  # doctest: +SKIP
    [PosixPath('figures/accuracy.png'), PosixPath('figures/accuracy.pdf'), ...]
    """
    paths: list[Path] = []
    for name, func in _STANDARD:
        try:
            fig = func(ds)
        except MissingVariableError:
            continue
        paths += save_figure(fig, out_dir, prefix + name)
    if not paths:
        raise MissingVariableError(
            "the dataset supports none of the standard figures (data variables: "
            f"{sorted(map(str, ds.data_vars))})"
        )
    return paths

"""Figures over training: accuracy curves, logit scale, norms."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .frames import _as_runs, _hue, _require, _view, _view_ratio, _xcol, run_table, to_long
from .style import (
    _SUBSET_ORDER,
    SUBSET_DASHES,
    MissingVariableError,
    _figure,
    _legend,
    _plain_log,
    _style,
    _suptitle,
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


_ACCURACY_PANELS = (
    ("clean_train_accuracy", "clean training examples"),
    ("noisy_train_accuracy", "noisy training examples\n(vs observed labels = memorization)"),
    ("val_accuracy", "noisy validation split"),
    ("test_accuracy", "test set"),
)

#: Records in the centred moving average of validation accuracy whose peak is the
#: best-validation (early-stopping) point.
SMOOTH = 5


def early_stopping(df: pd.DataFrame, x: str = "epoch") -> pd.DataFrame:
    """Per run: best test accuracy and where (``best``, ``best_x``), and the best-validation
    point (peak of the :data:`SMOOTH`-record moving average of ``val_accuracy``) with the test
    accuracy there (``sel_x``, ``at_sel``). ``df`` is :func:`to_long` of the accuracy curves."""
    rows = []
    for run, g in df.groupby("run", sort=False):
        test = g[g["variable"] == "test_accuracy"].sort_values(x)
        if test.empty:
            continue
        i = test["value"].to_numpy().argmax()
        row = {"run": run, "method_label": g["method_label"].iloc[0],
               "best_x": float(test[x].to_numpy()[i]), "best": float(test["value"].max()),
               "sel_x": math.nan, "at_sel": math.nan}
        val = g[g["variable"] == "val_accuracy"].sort_values(x)
        if not val.empty:
            smooth = val["value"].rolling(SMOOTH, center=True, min_periods=1).mean()
            sel = float(val[x].to_numpy()[smooth.to_numpy().argmax()])
            at = test.set_index(x)["value"]
            row.update(sel_x=sel, at_sel=float(at.get(sel, math.nan)))
        rows.append(row)
    return pd.DataFrame(rows, columns=["run", "method_label", "best_x", "best", "sel_x",
                                       "at_sel"])


def plot_accuracy_curves(ds: xr.Dataset, *, mark_peak: bool = True) -> Figure:
    """Clean-train, noisy-train (memorization), validation and test accuracy over training.

    One panel per available curve, hue = method (mean ± sd over seeds). With ``mark_peak``,
    each method's best-validation epoch (peak of the 5-record moving average of validation
    accuracy; the early-stopping point a practitioner can use) is a dotted vertical line in
    every panel, and a star in the test panel marks the mean over seeds of each run's best
    test accuracy (the paper's metric) at the mean epoch where it occurs. The box in the test
    panel gives both numbers per method: the means over seeds of the per-run values, i.e. the
    numbers of a summary table, not the maximum of the mean curve.

    Parameters
    ----------
    ds : xarray.Dataset
        One run or runs concatenated along ``run``, with any of ``clean_train_accuracy``,
        ``noisy_train_accuracy``, ``val_accuracy``, ``test_accuracy`` (fractions in [0, 1];
        NaN where not measured).
    mark_peak : bool, default True
        Mark the early-stopping points and give their accuracies.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    MissingVariableError
        If none of the accuracy curves is present.

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
    marks = early_stopping(df, x) if mark_peak else pd.DataFrame()
    per_method = marks.groupby("method_label").mean(numeric_only=True) if len(marks) else None
    with _style():
        fig, axes = _figure(len(panels), ncols=4 if len(panels) == 4 else None,
                            panel=(3.6, 3.0))
        for ax, (name, title) in zip(axes, panels):
            sub = df[df["variable"] == name]
            _lines(ax, sub, order, palette, style=False)
            ax.set_title(title)
            ax.set_ylabel("accuracy (%)")
            lo, hi = ax.get_ylim()
            ax.set_ylim(max(lo, 0.0), min(hi, 100.0))
            if per_method is None:
                continue
            for label in order:
                if label not in per_method.index:
                    continue
                sel = per_method.loc[label, "sel_x"]
                if math.isfinite(sel):
                    ax.axvline(sel, color=palette[label], ls=":", lw=1.1)
                if name == "test_accuracy":
                    ax.plot(per_method.loc[label, "best_x"], per_method.loc[label, "best"],
                            marker="*", ms=11, color=palette[label], mec="white", mew=0.8,
                            zorder=5, linestyle="none")
            if name == "test_accuracy":
                _peak_box(ax, per_method, order, palette)
        extra = []
        if per_method is not None:
            extra = [Line2D([], [], marker="*", ms=11, color="0.3", mec="white",
                            linestyle="none", label="best test acc.\n(mean of runs' best)"),
                     Line2D([], [], color="0.3", ls=":", label="best-validation epoch")]
        _legend(fig, order, palette, extra=extra)
        _suptitle(fig, "Accuracy over training", table)
    return fig


def _peak_box(ax, per_method: pd.DataFrame, order, palette) -> None:
    """Per method: mean best test accuracy and mean test accuracy at the best-val epoch."""
    y = 0.03
    for label in reversed([lab for lab in order if lab in per_method.index]):
        r = per_method.loc[label]
        text = f"{label}: best {r['best']:.1f}"
        if math.isfinite(r["at_sel"]):
            text += f", at best-val {r['at_sel']:.1f}"
        ax.text(0.97, y, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                color=palette[label],
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
        y += 0.075


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
    window = _early_window(ds)
    with _style():
        fig, axes = _figure(1 + (not ratio.empty) * (1 + (window is not None)))
        subsets = _lines(axes[0], sgd, order, palette)
        axes[0].set_title(r"mean logit scale at $w$ (SGD view)")
        axes[0].set_ylabel(r"$\Vert\delta_i\Vert_2$ (logit scale)")
        if not ratio.empty:
            views = [(axes[1], ratio, "whole run (log scale)")]
            if window is not None:
                early = ratio[ratio[_xcol(ratio)] <= window]
                views = [(axes[1], early, f"up to {_xcol(ratio)} {window:g} (twice the latest "
                                          "early-stopping point)"),
                         (axes[2], ratio, "whole run (log scale)")]
            for ax, part, when in views:
                _lines(ax, part, order, palette)
                ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
                if "log" in when:
                    ax.set_yscale("log")
                    _plain_log(ax)
                else:
                    _robust_ylim(ax, part)
                ax.set_title("SAM up-weighting: logit scale at\n"
                             r"$w + \varepsilon_i$ / at $w$, " + when, fontsize=9)
                ax.set_ylabel("logit-scale ratio SAM / SGD view")
        _legend(fig, order, palette, subsets)
        _suptitle(fig, "Logit scale of clean vs noisy examples", table)
    return fig


def _early_window(ds: xr.Dataset) -> float | None:
    """Twice the latest early-stopping point (best-val, else best test) of any method."""
    try:
        acc = to_long(ds, ["val_accuracy", "test_accuracy"], by_noise=False)
    except MissingVariableError:
        return None
    if acc.empty or not (acc["variable"] == "test_accuracy").any():
        return None
    marks = early_stopping(acc, _xcol(acc))
    points = marks["sel_x"].where(marks["sel_x"].notna(), marks["best_x"])
    per_method = points.groupby(marks["method_label"]).mean()
    if per_method.empty or not math.isfinite(per_method.max()):
        return None
    last = float(acc[_xcol(acc)].max())
    window = 2.0 * float(per_method.max())
    return window if 0 < window < last else None


def _robust_ylim(ax, df: pd.DataFrame) -> None:
    """Y limits from the 1st-99th percentiles of the per-(method, x, subset) means."""
    keys = ["method_label", _xcol(df)] + (["subset"] if "subset" in df else [])
    means = df.groupby(keys)["value"].mean().to_numpy()
    means = means[np.isfinite(means)]
    if means.size == 0:
        return
    lo, hi = np.quantile(means, [0.01, 0.99])
    pad = 0.1 * (hi - lo) or 0.02 * abs(hi) or 0.02
    ax.set_ylim(lo - pad, hi + pad)


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
            if not sub["view"].eq("sam/sgd").any() and (sub["value"] > 0).all():
                ax.set_yscale("log")  # norms span decades when one method runs away
                _plain_log(ax)
            if sub["view"].eq("sam/sgd").any():  # reference line, without rescaling the axis
                ylim = ax.get_ylim()
                ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
                ax.set_ylim(ylim)
        _legend(fig, order, palette, subsets)
        _suptitle(fig, "Jacobian, activation and weight norms", table)
    return fig

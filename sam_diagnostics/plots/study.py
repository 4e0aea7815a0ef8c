"""Figures of a multi-seed study from tidy frames of per-run results (no stored datasets).

- :func:`plot_tuning`: validation score over a tuning grid, mean ± paired standard error;
- :func:`plot_comparison`: per-method metric with 95% intervals and paired differences;
- :func:`plot_ablation`: SGD vs 1-SAM and their paired difference along one varied setting;
- :func:`plot_curves`: per-epoch curves (accuracy, norms, ratios) with each method's
  early-stopping epoch marked, robust axes so a runaway method does not flatten the others.

Inputs are pandas frames in long form; see each function for the columns it needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .style import _figure, _plain_log, _style, method_color

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262}


def _ci(values: np.ndarray) -> tuple[float, float]:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    if v.size == 1:
        return float(v[0]), 0.0
    t = _T975.get(v.size - 1, 1.96)
    return float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(v.size))


def plot_tuning(df: pd.DataFrame, *, title: str = "Tuning on the noisy validation split"
                ) -> Figure:
    """One panel per tuned method: smoothed validation peak vs grid value.

    ``df`` columns: ``method`` (panel), ``value`` (grid label, str), ``position`` (x order),
    ``mean`` (fraction), ``se`` (paired standard error to the best, fraction), ``chosen``
    (bool), ``tied`` (bool); optional ``sgd`` (SGD's mean on the same seeds, fraction).
    """
    methods = list(dict.fromkeys(df["method"]))
    with _style():
        fig, axes = _figure(len(methods), ncols=min(len(methods), 4), panel=(3.6, 3.0))
        for ax, method in zip(axes, methods):
            sub = df[df["method"] == method].sort_values("position")
            color = method_color(sub["key"].iloc[0] if "key" in sub else method)
            x = np.arange(len(sub))
            ax.errorbar(x, 100 * sub["mean"], yerr=100 * sub["se"].fillna(0), color=color,
                        marker="o", ms=4, capsize=3, lw=1.2)
            tied = sub["tied"].to_numpy(bool)
            ax.scatter(x[tied], 100 * sub["mean"].to_numpy()[tied], s=70, facecolors="none",
                       edgecolors="0.4", lw=1, zorder=4)
            chosen = sub["chosen"].to_numpy(bool)
            ax.scatter(x[chosen], 100 * sub["mean"].to_numpy()[chosen], marker="*", s=160,
                       color=color, edgecolors="white", zorder=5)
            if "sgd" in sub and np.isfinite(sub["sgd"].iloc[0]):
                ax.axhline(100 * sub["sgd"].iloc[0], color="0.3", ls=":", lw=1)
            ax.set_xticks(x, sub["value"], rotation=45 if len(x) > 5 else 0, fontsize=7)
            ax.set_title(method)
            ax.set_ylabel("smoothed val. peak (%)")
        handles = [Line2D([], [], marker="o", color="0.3", label="mean ± paired SE"),
                   Line2D([], [], marker="o", mfc="none", mec="0.4", ls="none", ms=9,
                          label="tied with the best"),
                   Line2D([], [], marker="*", color="0.3", ls="none", ms=11, label="chosen"),
                   Line2D([], [], color="0.3", ls=":", label="SGD")]
        fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=8)
        fig.suptitle(title, fontsize=11)
    return fig


def plot_comparison(df: pd.DataFrame, *, title: str = "Final comparison") -> Figure:
    """Per-method metrics with 95% intervals (left) and paired differences to SGD (right).

    ``df`` columns: ``label`` (row), ``method`` (colour), ``seed``, ``metric`` (panel name),
    ``value`` (fraction); the row whose ``method`` is ``"sgd"`` is the reference.
    """
    metrics = list(dict.fromkeys(df["metric"]))
    labels = list(dict.fromkeys(df["label"]))
    with _style():
        fig, axes = _figure(2 * len(metrics), ncols=2 * len(metrics), panel=(3.3, 0.4 * len(
            labels) + 1.2))
        for j, metric in enumerate(metrics):
            sub = df[df["metric"] == metric]
            ref = sub[sub["method"] == "sgd"].set_index("seed")["value"]
            ax, axd = axes[2 * j], axes[2 * j + 1]
            for i, lab in enumerate(labels):
                rows = sub[sub["label"] == lab]
                if rows.empty:
                    continue
                color = method_color(rows["method"].iloc[0])
                y = len(labels) - 1 - i
                m, h = _ci(rows["value"].to_numpy())
                ax.errorbar(100 * m, y, xerr=100 * h, color=color, marker="o", capsize=3)
                ax.scatter(100 * rows["value"], np.full(len(rows), y) + 0.18, s=8, color=color,
                           alpha=0.5)
                if len(ref) and rows["method"].iloc[0] != "sgd":
                    d = rows.set_index("seed")["value"] - ref
                    dm, dh = _ci(d.dropna().to_numpy())
                    axd.errorbar(100 * dm, y, xerr=100 * dh, color=color, marker="o", capsize=3)
            axd.axvline(0, color="0.3", lw=0.8, ls=":")
            for a in (ax, axd):
                a.set_yticks(range(len(labels)), labels[::-1] if a is ax else [""] * len(labels))
                a.set_ylim(-0.6, len(labels) - 0.4)
            ax.set_xlabel(f"{metric} (%)")
            axd.set_xlabel(f"paired Δ vs SGD (points)\n{metric}")
        fig.suptitle(title + "\nmean with 95% t-interval over seeds (dots: seeds)", fontsize=11)
    return fig


def plot_ablation(df: pd.DataFrame, *, xlabel: str, title: str, log_x: bool = True) -> Figure:
    """Best test accuracy of SGD and 1-SAM (left) and their paired difference (right).

    ``df`` columns: ``x`` (the varied setting), ``method`` ("sgd" / "sam"), ``seed``,
    ``value`` (fraction).
    """
    with _style():
        fig, (ax, axd) = _figure(2, panel=(3.8, 3.0))
        xs = sorted(df["x"].unique())
        for method, name in (("sgd", "SGD"), ("sam", "1-SAM")):
            stats = [_ci(df[(df["x"] == x) & (df["method"] == method)]["value"].to_numpy())
                     for x in xs]
            ax.errorbar(xs, [100 * m for m, _ in stats], yerr=[100 * h for _, h in stats],
                        color=method_color(method), marker="o", capsize=3, label=name)
        diffs = []
        for x in xs:
            sub = df[df["x"] == x].pivot_table(index="seed", columns="method", values="value")
            d = (sub["sam"] - sub["sgd"]).dropna() if {"sam", "sgd"} <= set(sub) else []
            diffs.append(_ci(np.asarray(d)))
        axd.errorbar(xs, [100 * m for m, _ in diffs], yerr=[100 * h for _, h in diffs],
                     color=method_color("sam"), marker="o", capsize=3)
        axd.axhline(0, color="0.3", ls=":", lw=0.8)
        for a in (ax, axd):
            if log_x:
                a.set_xscale("log")
                a.set_xticks(xs, [str(x) for x in xs])
                a.minorticks_off()
            a.set_xlabel(xlabel)
        ax.set_ylabel("best test accuracy (%)")
        axd.set_ylabel("1-SAM − SGD (points, paired)")
        ax.legend(frameon=False, fontsize=8)
        fig.suptitle(title + "\nmean with 95% t-interval over seeds", fontsize=11)
    return fig


def _robust_limits(values: np.ndarray, log: bool) -> tuple[float, float] | None:
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & ((v > 0) if log else True)]
    if v.size == 0:
        return None
    lo, hi = np.quantile(v, [0.01, 0.99])
    if log:
        return lo / 1.3, hi * 1.3
    pad = 0.08 * (hi - lo or abs(hi) or 1.0)
    return lo - pad, hi + pad


def plot_curves(df: pd.DataFrame, panels: Sequence[tuple[str, str, str]], *,
                marks: Mapping[str, float] | None = None, colors: Mapping[str, str],
                title: str, log: Sequence[str] = (), xmax: float | None = None,
                ncols: int = 3, robust: Sequence[str] = ()) -> Figure:
    """Mean ± sd (over seeds) curves per method, one panel per variable.

    ``df`` columns: ``label`` (hue), ``seed``, ``epoch``, ``variable``, ``value`` and optional
    ``subset`` ("clean" solid / "noisy" dashed). ``panels`` = (variable, title, y label).
    ``marks`` = {label: early-stopping epoch}: a dotted vertical line per method. Variables in
    ``log`` get a log y axis (mean lines only, no sd band); those in ``robust`` get y limits
    from the 1st-99th percentiles of the mean curves, so one runaway method does not flatten
    the others (it leaves the panel).
    """
    with _style():
        fig, axes = _figure(len(panels), ncols=min(ncols, len(panels)), panel=(4.0, 3.0))
        for ax, (var, ptitle, ylabel) in zip(axes, panels):
            sub = df[df["variable"] == var]
            if "subset" not in sub:
                sub = sub.assign(subset="all")
            if xmax is not None:
                sub = sub[sub["epoch"] <= xmax]
            means = []
            for (lab, subset), part in sub.groupby(["label", "subset"], sort=False):
                g = part.groupby("epoch")["value"]
                m, s = g.mean(), g.std().fillna(0)
                ls = "--" if subset == "noisy" else "-"
                ax.plot(m.index, m.values, color=colors[lab], ls=ls, lw=1.4)
                if ls == "-" and var not in log:  # no sd band on log axes (mean - sd < 0)
                    ax.fill_between(m.index, m - s, m + s, color=colors[lab], alpha=0.12, lw=0)
                means.append(m.values)
            if marks:
                for lab, epoch in marks.items():
                    if lab in colors and np.isfinite(epoch) and (xmax is None or epoch <= xmax):
                        ax.axvline(epoch, color=colors[lab], ls=":", lw=1.1)
            if var in log:
                ax.set_yscale("log")
                _plain_log(ax)
            if var in robust and means:
                lim = _robust_limits(np.concatenate(means), var in log)
                if lim:
                    ax.set_ylim(*lim)
            ax.set_title(ptitle)
            ax.set_ylabel(ylabel)
            ax.set_xlabel("epoch")
        handles = [Line2D([], [], color=c, lw=2, label=lab) for lab, c in colors.items()]
        shown = df[df["variable"].isin([var for var, _, _ in panels])]
        if "subset" in shown and shown["subset"].eq("noisy").any():
            handles += [Line2D([], [], ls="none", label=""),
                        Line2D([], [], color="0.3", label="clean probe examples"),
                        Line2D([], [], color="0.3", ls="--", label="noisy probe examples")]
        if marks:
            handles.append(Line2D([], [], color="0.3", ls=":", label="best-val epoch"))
        fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=8)
        fig.suptitle(title, fontsize=11)
    return fig

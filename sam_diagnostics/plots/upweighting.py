"""Per-example up-weighting by SAM against the margin."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .frames import _as_runs, _hue, run_table
from .style import _SUBSET_ORDER, SUBSET_PALETTE, MissingVariableError, _figure, _style, _suptitle


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
    when: str | None = None,
    sharey: bool = False,
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
    when : str, optional
        Describes the step in the title (default: "step N (epoch E)").
    sharey : bool, default False
        Share the y axis. By default each panel gets its own axis clipped to the 1st-99th
        percentile of its ratios (a few runaway examples, e.g. under L-SAM, leave the panel
        instead of flattening every other one; the mean text uses all examples).

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
        fig, axes = _figure(len(order), ncols=ncols, panel=(3.6, 3.1), sharey=sharey)
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
            if not sharey:
                lo, hi = np.nanquantile(sub["ratio"], [0.01, 0.99])
                pad = 0.1 * (hi - lo) or 0.05 * abs(hi) or 0.05
                ax.set_ylim(min(lo - pad, 1.0 - pad), max(hi + pad, 1.0 + pad))
            ax.set_title(label, color=palette[label])
            ax.set_xlabel(r"margin $z_y - \max_{c \neq y} z_c$ at $w$")
            ax.set_ylabel(
                r"logit-scale ratio $\Vert\delta_i(w+\varepsilon_i)\Vert\,/\,\Vert\delta_i(w)\Vert$"
                if i % ncols == 0 or not sharey
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
        if when is None:
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

"""Names, labels, colours and figure scaffolding shared by every figure, and saving."""

from __future__ import annotations

import colorsys
import contextlib
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

#: Order in which methods appear in every legend and hue mapping.
METHOD_ORDER: tuple[str, ...] = ("sgd", "sam", "lsam", "jsam", "regsgd", "adareg")


#: Display names; SAM with ``m == 1`` is shown as "1-SAM" (see :func:`method_label`).
METHOD_LABELS: dict[str, str] = {
    "sgd": "SGD",
    "sam": "SAM",
    "lsam": "L-SAM",
    "jsam": "J-SAM",
    "regsgd": "reg. SGD",
    "adareg": "adaptive reg.",
}


#: One colour per method, used by every figure (Okabe–Ito, colour-blind safe).
METHOD_PALETTE: dict[str, str] = {
    "sgd": "#000000",  # black: the baseline
    "sam": "#0072b2",  # blue
    "lsam": "#e69f00",  # orange
    "jsam": "#009e73",  # bluish green
    "regsgd": "#cc79a7",  # reddish purple
    "adareg": "#d55e00",  # vermillion
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


def _plain_log(ax) -> None:
    """Plain numbers on a log y axis (1, 2, 5, 10, 20, ...), no 10^k notation."""
    from matplotlib.ticker import FuncFormatter

    def minor(v, _):
        lead = v / 10 ** math.floor(math.log10(v)) if v > 0 else 0
        return f"{v:g}" if round(lead) in (2, 5) and abs(lead - round(lead)) < 1e-6 else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))

"""All standard figures of a dataset at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from .curves import _early_window, plot_accuracy_curves, plot_logit_scale, plot_norms
from .style import MissingVariableError, save_figure
from .upweighting import plot_upweighting


def _upweighting_at_peak(ds: xr.Dataset):
    """Up-weighting at the recorded step nearest the latest early-stopping point (before
    memorization), not at the end of training; the last step when no accuracy is stored."""
    window = _early_window(ds)
    if window is None or "epoch" not in ds.coords:
        return plot_upweighting(ds)
    epoch = ds["epoch"]
    if "run" in epoch.dims:
        epoch = epoch.max("run")
    distance = abs(epoch - window / 2.0)
    step = int(ds["step"].values[int(np.argmin(distance.fillna(1e18).values))])
    return plot_upweighting(ds, step=step)


_STANDARD = (
    ("accuracy", plot_accuracy_curves),
    ("logit_scale", plot_logit_scale),
    ("norms", plot_norms),
    ("upweighting", _upweighting_at_peak),
)


def plot_standard(ds: xr.Dataset, out_dir: str | Path, *, prefix: str = "") -> list[Path]:
    """Render and save every standard figure the dataset supports.

    Figures whose variables are all absent are skipped (accuracy, logit_scale, norms,
    upweighting, in that order), each saved as PNG and PDF by :func:`save_figure`. The
    up-weighting scatter is drawn at the latest early-stopping point when accuracy curves are
    stored (the mechanism acts before memorization), else at the last step.

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

"""The ``ds.sd`` accessor: the package's summaries and figures as methods of a stored run.

Registered on ``import sam_diagnostics`` (``xarray.register_dataset_accessor("sd")``), the way
xarray users expect domain helpers. Every method calls the existing functions of
:mod:`sam_diagnostics.summary`, :mod:`sam_diagnostics.plots` and :mod:`sam_diagnostics.live`;
nothing is computed twice. Works on one run and on runs merged along ``run``
(:func:`~sam_diagnostics.merge_runs`).

Examples
--------
::

    import sam_diagnostics as sd

    ds = sd.open_run("runs/sam.zarr")
    ds.sd.summary()                      # best / final accuracies (a DataFrame)
    ds.sd.plot("logit_scale")            # a matplotlib Figure
    ds.sd.plot(out_dir="figures")        # every standard figure, saved as PNG + PDF
    ds.sd.ratio("logit_scale")           # SAM-view / SGD-view ratio of clean / noisy means
    ds.sd.at_peak()                      # the record at the best test accuracy
    ds.sd.noisy()                        # only the noisy probe examples
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from os import PathLike
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

__all__ = ["SDAccessor", "PLOTS"]

#: ``kind`` of :meth:`SDAccessor.plot` -> name of the function in :mod:`sam_diagnostics.plots`.
PLOTS: dict[str, str] = {
    "accuracy": "plot_accuracy_curves",
    "logit_scale": "plot_logit_scale",
    "norms": "plot_norms",
    "upweighting": "plot_upweighting",
}


@xr.register_dataset_accessor("sd")
class SDAccessor:
    """``ds.sd``: summaries, figures, view ratios and selections of a stored run.

    Parameters
    ----------
    ds : xarray.Dataset
        One run, or runs concatenated along ``run``, in the schema of
        :mod:`sam_diagnostics.store`.
    """

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    # ------------------------------------------------------------------ tables
    def summary(self) -> pd.DataFrame:
        """One row per run: best and final test accuracy, clean/noisy training accuracy at the
        best epoch, configuration (:func:`~sam_diagnostics.summary.summary_table`).

        Examples
        --------
        >>> ds.sd.summary()[["optimizer", "best_test_acc", "best_epoch"]]  # doctest: +SKIP
        """
        from .summary import summary_table

        return summary_table(self._ds)

    def group_summary(self) -> pd.DataFrame:
        """Mean ± std over seeds of :meth:`summary`
        (:func:`~sam_diagnostics.summary.group_summary`)."""
        from .summary import group_summary

        return group_summary(self.summary())

    def to_long(self, variables: str | Sequence[str], *, by_noise: bool = True) -> pd.DataFrame:
        """Tidy frame averaged over probe examples (:func:`~sam_diagnostics.plots.to_long`)."""
        from .plots import to_long

        return to_long(self._ds, variables, by_noise=by_noise)

    def live(self, step: int = -1) -> dict[str, float]:
        """The live scalars (:func:`~sam_diagnostics.live.live_summary`) of one record, by
        position along ``step`` (default: the last). One run only."""
        from .live import live_summary

        ds = self._ds
        return live_summary(ds.isel(step=[step]) if "step" in ds.dims else ds)

    # ------------------------------------------------------------------ figures
    def plot(self, kind: str = "standard", *, out_dir: str | PathLike | None = None,
             **kwargs: Any):
        """Draw one of the standard figures, or save all of them.

        Parameters
        ----------
        kind : {"standard", "accuracy", "logit_scale", "norms", "upweighting"}
            ``"standard"`` saves every figure the data supports to ``out_dir``
            (:func:`~sam_diagnostics.plots.plot_standard`); the others return one figure.
        out_dir : path, optional
            Save the figure there (PNG + PDF, named ``kind``) and return the paths.
        **kwargs
            Passed to the figure function (e.g. ``step=`` of ``plot_upweighting``).

        Returns
        -------
        matplotlib.figure.Figure or list of pathlib.Path

        Examples
        --------
        >>> fig = ds.sd.plot("logit_scale")  # doctest: +SKIP
        >>> ds.sd.plot(out_dir="figures")  # doctest: +SKIP
        [PosixPath('figures/accuracy.png'), ...]
        """
        from . import plots

        if kind == "standard":
            if out_dir is None:
                raise ValueError("plot('standard') saves every figure: pass out_dir=...")
            return plots.plot_standard(self._ds, out_dir, **kwargs)
        if kind not in PLOTS:
            raise ValueError(f"kind must be 'standard' or one of {sorted(PLOTS)}, got {kind!r}")
        fig = getattr(plots, PLOTS[kind])(self._ds, **kwargs)
        if out_dir is not None:
            return plots.save_figure(fig, out_dir, kind)
        return fig

    # ------------------------------------------------------------------ quantities
    def ratio(self, variable: str = "logit_scale", *, by_noise: bool = True,
              per_example: bool = False) -> xr.DataArray:
        """SAM-view / SGD-view ratio of a per-example variable: the paper's two effects.

        Parameters
        ----------
        variable : str
            A variable with a ``view`` dimension (``logit_scale``, ``jacobian_norm``,
            ``grad_norm``, ``loss``, ``activation_norm``...).
        by_noise : bool
            Average clean and noisy probe examples separately (a ``subset`` dimension
            ``["clean", "noisy"]``; ``["all"]`` without ``is_noisy``).
        per_example : bool
            Return the per-example ratio ``x_i(w + ε_i) / x_i(w)`` instead (over
            ``example``), as :func:`~sam_diagnostics.plots.plot_upweighting` draws it.

        Returns
        -------
        xarray.DataArray
            The ratio of example means (as in the figures), over the remaining dims
            (``[run,] step, subset[, layer]``), named ``<variable>_ratio``.

        Examples
        --------
        >>> r = ds.sd.ratio("logit_scale")  # doctest: +SKIP
        >>> r.sel(subset="clean") > r.sel(subset="noisy")  # finding 1, early  # doctest: +SKIP
        """
        ds = self._ds
        if variable not in ds.data_vars:
            raise KeyError(f"{variable!r} is not in the dataset (data variables: "
                           f"{sorted(map(str, ds.data_vars))})")
        da = ds[variable]
        if "view" not in da.dims or not {"sgd", "sam"} <= set(map(str, da["view"].values)):
            raise ValueError(f"{variable!r} has no SGD and SAM views to compare")
        sgd, sam = da.sel(view="sgd", drop=True), da.sel(view="sam", drop=True)
        if per_example:
            with np.errstate(divide="ignore", invalid="ignore"):
                return (sam / sgd).rename(f"{variable}_ratio")
        if "example" not in da.dims:
            return (sam / sgd).rename(f"{variable}_ratio")
        masks = self._masks(by_noise)
        parts = []
        for mask in masks.values():
            s = sam if mask is None else sam.where(mask)
            g = sgd if mask is None else sgd.where(mask)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an empty subset: NaN
                parts.append(s.mean("example") / g.mean("example"))
        out = xr.concat(parts, dim=pd.Index(list(masks), name="subset"))
        return out.drop_vars([c for c in ("is_noisy", "label", "true_label")
                              if c in out.coords]).rename(f"{variable}_ratio")

    def _masks(self, by_noise: bool) -> dict[str, xr.DataArray | None]:
        ds = self._ds
        if not by_noise or "is_noisy" not in ds.coords:
            return {"all": None}
        noisy = ds["is_noisy"].astype(bool)
        return {"clean": ~noisy, "noisy": noisy}

    # ------------------------------------------------------------------ selections
    def peak_step(self, metric: str = "test_accuracy") -> int | xr.DataArray:
        """``step`` at which ``metric`` is largest (per run when there is a ``run`` dim)."""
        ds = self._ds
        if metric not in ds.data_vars:
            raise KeyError(f"{metric!r} is not in the dataset")
        da = ds[metric]
        if "run" in da.dims:
            return da.fillna(-np.inf).idxmax("step")
        if np.isnan(da.values).all():
            raise ValueError(f"{metric!r} is NaN at every step")
        return int(da.idxmax("step").item())

    def at_peak(self, metric: str = "test_accuracy") -> xr.Dataset:
        """The record at the step with the largest ``metric`` (the early-stopping point).

        With a ``run`` dimension, each run is taken at its own peak (``step`` then becomes a
        per-run coordinate ``peak_step``).

        Examples
        --------
        >>> ds.sd.at_peak()["logit_scale"].sel(view="sgd").mean()  # doctest: +SKIP
        """
        ds = self._ds
        if "run" not in ds.dims:
            return ds.sel(step=self.peak_step(metric))
        steps = self.peak_step(metric)
        parts = [ds.isel(run=[i]).sel(step=int(steps.values[i]))
                 .assign_coords(peak_step=("run", [int(steps.values[i])]))
                 for i in range(ds.sizes["run"])]
        return xr.concat(parts, dim="run", data_vars="minimal", coords="minimal",
                         compat="override", combine_attrs="override").drop_vars(
            "step", errors="ignore")

    def last(self) -> xr.Dataset:
        """The latest record (``ds.isel(step=-1)``)."""
        return self._ds.isel(step=-1)

    def clean(self) -> xr.Dataset:
        """Only the clean probe examples."""
        return self._examples(False)

    def noisy(self) -> xr.Dataset:
        """Only the noisy probe examples (whose observed label is wrong)."""
        return self._examples(True)

    def _examples(self, noisy: bool) -> xr.Dataset:
        ds = self._ds
        if "is_noisy" not in ds.coords:
            raise ValueError("the dataset has no is_noisy coordinate")
        flag = ds["is_noisy"].astype(bool)
        if flag.ndim != 1:
            raise ValueError("is_noisy varies by run; select a run first (ds.isel(run=i))")
        return ds.isel(example=np.flatnonzero(flag.values == noisy))

    def config(self) -> dict[str, Any]:
        """The run's configuration and provenance (its attrs, as a plain dict)."""
        return dict(self._ds.attrs)

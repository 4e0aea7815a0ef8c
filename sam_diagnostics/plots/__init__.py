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
The package never imports torch nor the rest of the package: it reads stored data only.

Modules: :mod:`.style` (names, palette, figure scaffolding, saving), :mod:`.frames` (long-form
frames), :mod:`.curves` (accuracy, logit scale, norms over training), :mod:`.upweighting`,
:mod:`.study` (figures of the label-noise study's summary tables) and :mod:`.standard`.
"""

from __future__ import annotations

from .curves import plot_accuracy_curves, plot_logit_scale, plot_norms
from .frames import run_table, to_long
from .standard import plot_standard
from .style import (
    CONFIG_KEYS,
    METHOD_LABELS,
    METHOD_ORDER,
    METHOD_PALETTE,
    SUBSET_PALETTE,
    MissingVariableError,
    method_color,
    method_label,
    save_figure,
)
from .upweighting import plot_upweighting

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

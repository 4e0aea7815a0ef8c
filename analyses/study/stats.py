"""Numbers of the study: per-run metrics, tuning selection above the noise, paired intervals.

Everything here is plain numpy on the per-run summaries (:mod:`analyses.study.runs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Width (epochs) of the centred moving average applied to validation accuracy before its
#: peak is taken: one noisy epoch cannot pick the early-stopping point or the tuning winner.
SMOOTH = 5

def t975(dof: int) -> float:
    """Two-sided 95% quantile of Student's t with ``dof`` degrees of freedom (NaN below 1)."""
    if dof < 1:
        return math.nan
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def smooth(values: Sequence[float], width: int = SMOOTH) -> np.ndarray:
    """Centred moving average ignoring NaN (shorter windows at the ends)."""
    v = np.asarray(values, float)
    if width <= 1 or v.size == 0:
        return v
    half = width // 2
    out = np.full(v.size, np.nan)
    for i in range(v.size):
        w = v[max(0, i - half): i + half + 1]
        if np.isfinite(w).any():
            out[i] = np.nanmean(w)
    return out


def run_metrics(summary: dict) -> dict:
    """Metrics of one run from its summary (accuracies as fractions; epochs as numbers).

    - ``best_test``: best test accuracy over training (the paper's metric; looks at test);
    - ``sel_epoch``: epoch of the peak of the smoothed validation accuracy (early stopping);
    - ``test_at_sel``: test accuracy at ``sel_epoch`` (a practitioner's metric);
    - ``val_peak``: the smoothed validation peak (the tuning score);
    - ``final_test``: test accuracy at the end; ``noisy_fit_at_sel``: fraction of noisy
      training labels fitted at ``sel_epoch``.
    """
    epoch = np.asarray(summary["epoch"], float)
    test = np.asarray(summary.get("test_accuracy", [np.nan] * epoch.size), float)
    val = smooth(summary.get("val_accuracy", [np.nan] * epoch.size))
    out = {"best_test": np.nan, "best_test_epoch": np.nan, "sel_epoch": np.nan,
           "test_at_sel": np.nan, "val_peak": np.nan, "final_test": np.nan,
           "noisy_fit_at_sel": np.nan, "sel_index": -1}
    if np.isfinite(test).any():
        b = int(np.nanargmax(test))
        out.update(best_test=test[b], best_test_epoch=epoch[b],
                   final_test=test[np.flatnonzero(np.isfinite(test))[-1]])
    if np.isfinite(val).any():
        s = int(np.nanargmax(val))
        noisy = np.asarray(summary.get("noisy_train_accuracy", [np.nan] * epoch.size), float)
        out.update(sel_epoch=epoch[s], test_at_sel=test[s], val_peak=val[s],
                   noisy_fit_at_sel=noisy[s], sel_index=s)
    return out


def mean_ci(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, half-width of the 95% t interval, n (NaN half-width for n < 2)."""
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    n = v.size
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(v[0]), math.nan, 1
    return float(v.mean()), float(t975(n - 1) * v.std(ddof=1) / math.sqrt(n)), n


def paired(a: dict, b: dict) -> tuple[float, float, int]:
    """Paired difference ``a - b`` over the seeds both have: mean, 95% half-width, n."""
    seeds = sorted(set(a) & set(b))
    return mean_ci([a[s] - b[s] for s in seeds])


def paired_se(a: dict, b: dict) -> float:
    """Standard error of the mean paired difference ``a - b`` (NaN below 2 seeds)."""
    seeds = sorted(set(a) & set(b))
    d = np.asarray([a[s] - b[s] for s in seeds], float)
    d = d[np.isfinite(d)]
    return float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan


def select(scores: dict, order: Sequence) -> dict:
    """Choose a grid value from per-seed validation scores ``{value: {seed: score}}``.

    Rule (stated before any run; never looks at test data): the value with the best mean
    score wins unless another value is within one paired standard error of it; then all such
    values are *tied* and the winner is the tied value nearest the median position of the
    tied values in the grid (per axis when the values are tuples of a product grid, e.g.
    (γ_a, γ_V); distances in grid steps), the earlier one in ``order`` on an exact tie. On a
    one-axis grid this is the middle tied value (the lower of the two middle ones). Ties are
    thus broken toward the interior of the tied region, away from the cliff where SAM stalls
    and from the weakest setting. Returns the choice, the best value, the table of means /
    paired SEs / tied flags, and the tie set.
    """
    means = {k: float(np.nanmean(list(v.values()))) for k, v in scores.items() if v}
    if not means:
        return {"choice": None, "table": [], "tied": []}
    best = max(means, key=lambda k: (means[k], -list(order).index(k)))
    table, tied = [], []
    for k in order:
        if k not in means:
            continue
        se = 0.0 if k == best else paired_se(scores[k], scores[best])
        gap = means[best] - means[k]
        is_tied = k == best or (np.isfinite(se) and gap <= se)
        if is_tied:
            tied.append(k)
        table.append({"value": k, "mean": means[k], "gap_to_best": gap, "paired_se": se,
                      "tied": is_tied, "seeds": len(scores[k])})
    return {"choice": _middle(tied, order) if tied else best, "best": best, "table": table,
            "tied": tied}


def _middle(tied: list, order: Sequence):
    """The tied value nearest the per-axis median grid position of the tied values."""
    values = list(order)
    if not isinstance(values[0], (tuple, list)):
        pos = {v: (i,) for i, v in enumerate(values)}
    else:
        axes = [sorted({v[a] for v in values}) for a in range(len(values[0]))]
        pos = {v: tuple(ax.index(v[a]) for a, ax in enumerate(axes)) for v in values}
    centre = np.median(np.asarray([pos[v] for v in tied], float), axis=0)
    return min(tied, key=lambda v: (float(np.sum((np.asarray(pos[v]) - centre) ** 2)),
                                    values.index(v)))

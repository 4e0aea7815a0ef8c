"""Tables of the study from the finished runs: one tidy frame of runs, then markdown tables.

Accuracies are shown in % as ``mean ± h`` where ``h`` is the half-width of the 95% t interval
over seeds; differences to a reference method are *paired* over seeds (same seed = same noisy
labels, split, initialization and batch order) and shown as ``+d [lo, hi]``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .runs import Run, finished
from .stats import mean_ci, paired, run_metrics

LABELS = {"sgd": "SGD", "sam": "1-SAM", "lsam": "L-SAM", "jsam": "J-SAM",
          "regsgd": "reg. SGD", "adareg": "adaptive reg."}
PAPER = {"sgd": 52.48, "sam": 69.47, "jsam": 69.17, "lsam": 54.13, "regsgd": 60.8}
METRICS = {"best_test": "best test (paper)", "test_at_sel": "test at best-val epoch"}


def frame(runs: list[Run], root) -> pd.DataFrame:
    """One row per finished run: its configuration, metrics and mechanism values."""
    rows = []
    for r, summary in finished(runs, root):
        m = run_metrics(summary)
        row = {"group": r.group, "method": r.optimizer, "seed": r.seed, "rho": r.rho,
               "gamma": (r.gamma_act, r.gamma_weight), "wd": r.weight_decay,
               "n_samples": r.n_samples or 0, "width": r.width,
               "seconds": summary.get("seconds", math.nan), "path": str(r.path(root)), **m}
        s = m["sel_index"]
        for key in ("last_layer_weight_norm", "penultimate_activation_norm"):
            values = np.asarray(summary.get(key, []), float)
            row[f"{key}@sel"] = values[s] if values.size and s >= 0 else math.nan
            row[f"{key}@end"] = values[-1] if values.size else math.nan
        for subset in ("clean", "noisy"):
            values = np.asarray(summary.get(f"logit_scale_ratio_{subset}", []), float)
            upto = values[1: s + 1] if s >= 1 else values[1:2]  # records after init, to sel
            row[f"ls_ratio_{subset}@pre"] = float(np.nanmean(upto)) if upto.size else math.nan
            row[f"ls_ratio_{subset}@end"] = values[-1] if values.size else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _by_seed(df: pd.DataFrame, col: str) -> dict:
    return {int(k): float(v) for k, v in zip(df["seed"], df[col])}


def pm(values, scale: float = 100.0, digits: int = 1) -> str:
    mean, half, n = mean_ci(values)
    if n == 0:
        return "–"
    if not math.isfinite(half):
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * half:.{digits}f}"


def diff(a: dict, b: dict, scale: float = 100.0) -> tuple[str, bool]:
    """``+d [lo, hi]`` of the paired difference and whether its interval excludes 0."""
    mean, half, n = paired(a, b)
    if n == 0:
        return "–", False
    if not math.isfinite(half):
        return f"{scale * mean:+.1f} (1 seed)", False
    lo, hi = mean - half, mean + half
    return (f"{scale * mean:+.1f} [{_bound(scale * lo)}, {_bound(scale * hi)}]",
            lo > 0 or hi < 0)


def _bound(x: float) -> str:
    """An interval end with one decimal, or two where one would print a misleading ±0.0."""
    return f"{x:+.2f}" if abs(x) < 0.05 else f"{x:+.1f}"


def label(row_method: str, rho: float | None = None, gamma=None, wd: float = 0.0) -> str:
    text = LABELS.get(row_method, row_method)
    if rho is not None and row_method in ("sam", "lsam", "jsam", "adareg"):
        text += f" (ρ={rho:g})"
    if gamma is not None and row_method == "regsgd":
        text += f" (γ={gamma[0]:g}, {gamma[1]:g})"
    if wd:
        text += f", wd {wd:g}"
    return text


def comparison(df: pd.DataFrame, configs: list[tuple[str, dict]], reference: dict,
               anchor: dict | None = None, setting: str | None = None) -> tuple[str, dict]:
    """Markdown table of the configs (label, selector) with paired differences to
    ``reference`` (SGD) and, when the 1-SAM − SGD gap is resolved, the share of it kept.

    Returns the table and ``{label: {metric: per-seed dict}}`` for the findings."""
    cols = (["setting"] if setting else []) + ["method", "seeds"]
    for name in METRICS.values():
        cols += [f"{name} %", "Δ vs SGD (paired 95% CI)"]
    cols += ["share of the 1-SAM gap", "best-val epoch", "noisy labels fitted there %",
             "final test %"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    seeds_of: dict = {}
    ref = {k: _by_seed(reference, k) for k in METRICS} if len(reference) else {}
    anc = {k: _by_seed(anchor, k) for k in METRICS} if anchor is not None and len(anchor) else {}
    resolved = {}
    for k in METRICS:
        if ref and anc:
            resolved[k] = diff(anc[k], ref[k])[1]
    for position, (name, sub) in enumerate(configs):
        if not len(sub):
            continue
        cells = ([setting] if setting else []) + [name, str(len(sub))]
        per = {k: _by_seed(sub, k) for k in METRICS}
        seeds_of[name] = per
        shares = []
        for k in METRICS:
            cells.append(pm(sub[k]))
            cells.append(diff(per[k], ref[k])[0] if ref and position > 0 else "—")
            if position < 2:  # the reference and the anchor themselves
                continue
            if resolved.get(k):
                gap = paired(anc[k], ref[k])[0]
                own = paired(per[k], ref[k])[0]
                shares.append(f"{own / gap:.0%}" if gap else "–")
            elif k in resolved:
                shares.append("gap within noise")
        cells.append(" / ".join(shares) if shares else "–")
        cells.append(pm(sub["sel_epoch"], 1.0, 0))
        cells.append(pm(sub["noisy_fit_at_sel"]))
        cells.append(pm(sub["final_test"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), seeds_of


def tuning_table(result: dict, variant: str) -> str:
    rows = result.get("table", [])
    if not rows:
        return "(no finished tuning runs)"
    head = ("| value | seeds | smoothed val. peak % | below best | paired SE | tied |\n"
            "|---|---|---|---|---|---|")
    lines = [head]
    for row in rows:
        v = row["value"]
        v = f"γ_a={v[0]:g}, γ_V={v[1]:g}" if isinstance(v, (list, tuple)) else f"ρ={v:g}"
        if row["value"] == result.get("choice") or list(np.atleast_1d(row["value"])) == list(
                np.atleast_1d(result.get("choice"))):
            v = f"**{v}** (chosen)"
        se = row["paired_se"]
        lines.append(f"| {v} | {row['seeds']} | {100 * row['mean']:.2f} | "
                     f"{100 * row['gap_to_best']:.2f} | "
                     f"{'–' if not np.isfinite(se) or se == 0 else f'{100 * se:.2f}'} | "
                     f"{'yes' if row['tied'] else ''} |")
    sgd = list(result.get("sgd_val", {}).values())
    if sgd:
        lines.append(f"| SGD (reference) | {len(sgd)} | {100 * np.mean(sgd):.2f} | | | |")
    return "\n".join(lines)


def mechanism_table(df: pd.DataFrame, configs: list[tuple[str, pd.DataFrame]]) -> str:
    cols = ["method", "best-val epoch", "‖a‖ at best-val", "‖V‖ at best-val", "‖a‖ at end",
            "‖V‖ at end", "SAM/SGD logit-scale ratio to best-val: clean", "noisy",
            "clean − noisy (paired)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, sub in configs:
        if not len(sub):
            continue
        clean, noisy = _by_seed(sub, "ls_ratio_clean@pre"), _by_seed(sub, "ls_ratio_noisy@pre")
        d = diff(clean, noisy, scale=1.0)[0] if clean else "–"
        d = d.replace("+", "+").replace("[", "[") if d != "–" else d
        lines.append("| " + " | ".join([
            name, pm(sub["sel_epoch"], 1.0, 0),
            pm(sub["penultimate_activation_norm@sel"], 1.0),
            pm(sub["last_layer_weight_norm@sel"], 1.0),
            pm(sub["penultimate_activation_norm@end"], 1.0),
            pm(sub["last_layer_weight_norm@end"], 1.0),
            pm(sub["ls_ratio_clean@pre"], 1.0, 3), pm(sub["ls_ratio_noisy@pre"], 1.0, 3),
            _diff3(clean, noisy)]) + " |")
    return "\n".join(lines)


def _diff3(a: dict, b: dict) -> str:
    mean, half, n = paired(a, b)
    if n == 0 or not math.isfinite(mean):
        return "–"
    if not math.isfinite(half):
        return f"{mean:+.3f}"
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"


def ablation_table(df: pd.DataFrame, key: str, title: str) -> str:
    lines = [f"| {title} | seeds | SGD best test % | 1-SAM best test % | 1-SAM − SGD best test "
             "(paired) | 1-SAM − SGD at best-val epoch (paired) |", "|---|---|---|---|---|---|"]
    groups = dict(tuple(df.groupby(key, sort=True)))
    for value in sorted(groups, key=lambda v: (v == 0, v)):  # 0 = the whole pool, last
        sub = groups[value]
        sgd, sam = sub[sub["method"] == "sgd"], sub[sub["method"] == "sam"]
        if not len(sgd) or not len(sam):
            continue
        shown = "all (4,000)" if key == "n_samples" and value == 0 else str(value)
        lines.append(f"| {shown} | {min(len(sgd), len(sam))} | {pm(sgd['best_test'])} | "
                     f"{pm(sam['best_test'])} | "
                     f"{diff(_by_seed(sam, 'best_test'), _by_seed(sgd, 'best_test'))[0]} | "
                     f"{diff(_by_seed(sam, 'test_at_sel'), _by_seed(sgd, 'test_at_sel'))[0]} |")
    return "\n".join(lines)


def paper_table() -> str:
    lo, hi = PAPER["sgd"], PAPER["sam"]
    lines = ["| method | best test % (CIFAR-10, ResNet-18) | share of the 1-SAM gap |",
             "|---|---|---|"]
    for m, v in PAPER.items():
        lines.append(f"| {LABELS[m]} | {v} | {(v - lo) / (hi - lo):.0%} |")
    return "\n".join(lines)


#: The summary's columns: (heading, method label prefix, reference label prefix)
SUMMARY = (("1-SAM − SGD", "1-SAM", "SGD"), ("J-SAM − 1-SAM", "J-SAM", "1-SAM"),
           ("L-SAM − SGD", "L-SAM", "SGD"), ("reg. SGD − 1-SAM", "reg. SGD", "1-SAM"),
           ("adaptive reg. − 1-SAM", "adaptive reg.", "1-SAM"),
           ("adaptive reg. − reg. SGD", "adaptive reg.", "reg. SGD"))


def summary_table(per_setting: dict[str, dict], metric: str) -> str:
    """One row per setting of the main comparison (every variant at 1-SAM's ρ): paired
    differences over seeds ``+d [lo, hi]`` in points; ``per_setting`` maps a setting to the
    ``seeds_of`` of :func:`comparison` (the first label starting with a prefix is used, so the
    adaptive regularizer is its tuned-ρ row)."""
    cols = ["setting", *(c[0] for c in SUMMARY)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, seeds_of in per_setting.items():
        def pick(prefix, seeds_of=seeds_of):
            lab = next((lab for lab in seeds_of if lab == prefix or lab.startswith(prefix + " ")),
                       None)
            return seeds_of[lab][metric] if lab is not None else None
        cells = [name]
        for _, a, b in SUMMARY:
            x, y = pick(a), pick(b)
            cells.append(diff(x, y)[0] if x is not None and y is not None else "not run")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""Figures of the study (built with :mod:`sam_diagnostics.plots`), from the finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from sam_diagnostics.plots import method_color, save_figure
from sam_diagnostics.plots.study import plot_ablation, plot_comparison, plot_curves, plot_tuning

from .runs import load_summary
from .stats import smooth
from .tables import LABELS, METRICS

_PALETTE_EXTRA = ("#882255", "#44aa99", "#999933", "#661100")


def _save(fig, fig_dir: Path, name: str) -> list[Path]:
    return save_figure(fig, fig_dir, name, formats=("png",))


def tuning(choices: dict, fig_dir: Path) -> list[Path]:
    rows = []
    for variant, res in choices.items():
        for i, row in enumerate(res.get("table", [])):
            v = row["value"]
            text = f"{v[0]:g}/{v[1]:g}" if isinstance(v, (list, tuple)) else f"{v:g}"
            sgd = list(res.get("sgd_val", {}).values())
            rows.append({"method": LABELS[variant] + (" (γ_a/γ_V)" if variant == "regsgd"
                                                      else " (ρ)"),
                         "key": variant, "value": text, "position": i, "mean": row["mean"],
                         "se": row["paired_se"], "tied": row["tied"],
                         "chosen": list(np.atleast_1d(v)) == list(np.atleast_1d(
                             res.get("choice"))),
                         "sgd": np.mean(sgd) if sgd else np.nan})
    if not rows:
        return []
    return _save(plot_tuning(pd.DataFrame(rows)), fig_dir, "tuning")


def comparison(cfg, fig_dir: Path, name: str) -> list[Path]:
    rows = []
    for label, sub in cfg:
        for _, r in sub.iterrows():
            for metric, mname in METRICS.items():
                rows.append({"label": label, "method": r["method"], "seed": r["seed"],
                             "metric": mname, "value": r[metric]})
    if not rows:
        return []
    fig = plot_comparison(pd.DataFrame(rows), title=f"{name}: final comparison")
    return _save(fig, fig_dir, "comparison")


def _colors(cfg) -> dict:
    colors, used = {}, set()
    extra = iter(_PALETTE_EXTRA)
    for label, sub in cfg:
        if not len(sub):
            continue
        c = method_color(sub["method"].iloc[0])
        if c in used:
            c = next(extra, "#777777")
        used.add(c)
        colors[label] = c
    return colors


def _long(cfg) -> tuple[pd.DataFrame, dict]:
    """Per-epoch long frame of the summaries of every run in ``cfg`` and best-val epochs."""
    frames, marks = [], {}
    for label, sub in cfg:
        for _, r in sub.iterrows():
            s = load_summary(Path(r["path"]))
            if s is None:
                continue
            epoch = np.asarray(s["epoch"], float)
            series = {
                "test_accuracy": 100 * np.asarray(s.get("test_accuracy", []), float),
                "val_smoothed": 100 * smooth(s.get("val_accuracy", [])),
                "noisy_train_accuracy": 100 * np.asarray(s.get("noisy_train_accuracy", []),
                                                         float),
                "clean_train_accuracy": 100 * np.asarray(s.get("clean_train_accuracy", []),
                                                         float),
                "penultimate_activation_norm": s.get("penultimate_activation_norm"),
                "last_layer_weight_norm": s.get("last_layer_weight_norm"),
            }
            for var, values in series.items():
                if values is None or not len(values):
                    continue
                frames.append(pd.DataFrame({"label": label, "seed": r["seed"], "epoch": epoch,
                                            "variable": var, "value": np.asarray(values, float),
                                            "subset": "all"}))
            for subset in ("clean", "noisy"):
                values = s.get(f"logit_scale_ratio_{subset}")
                if values:
                    frames.append(pd.DataFrame({"label": label, "seed": r["seed"],
                                                "epoch": epoch, "variable": "ls_ratio",
                                                "value": np.asarray(values, float),
                                                "subset": subset}))
        if len(sub):
            marks[label] = float(np.nanmean(sub["sel_epoch"]))
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), marks


def curves(root, cfg, all_runs, fig_dir: Path, name: str, prefix: str = "") -> list[Path]:
    cfg = [(lab, sub) for lab, sub in cfg if len(sub)]
    df, marks = _long(cfg)
    if df.empty:
        return []
    colors = _colors(cfg)
    paths = []
    acc = [("test_accuracy", "test accuracy", "%"),
           ("val_smoothed", "noisy validation accuracy\n(5-epoch mean; peak = best-val epoch)",
            "%"),
           ("noisy_train_accuracy", "noisy training labels fitted\n(memorization)", "%"),
           ("clean_train_accuracy", "clean training examples", "%")]
    fig = plot_curves(df, acc, marks=marks, colors=colors, ncols=4,
                      title=f"{name}: accuracy over training (mean ± sd over seeds; dotted: "
                            "mean best-val epoch)")
    paths += _save(fig, fig_dir, prefix + "accuracy")
    last = max(marks.values()) if marks else None
    window = None if last is None else min(max(10.0, 2.0 * last), float(df["epoch"].max()))
    norms = [("penultimate_activation_norm", "penultimate activation ‖a‖ (log)", "mean ‖a_i‖"),
             ("last_layer_weight_norm", "last-layer weight ‖V‖_F (log)", "‖V‖_F")]
    # finding 1 is about the time before the peak: each method up to its own best-val epoch
    ratio = df[df["variable"] == "ls_ratio"]
    pre = ratio[ratio["epoch"] <= ratio["label"].map(marks).fillna(-1)].assign(
        variable="ls_ratio_pre")
    df = pd.concat([df, pre], ignore_index=True)
    early = [*norms, ("ls_ratio_pre", "SAM up-weighting before the peak:\nlogit-scale ratio "
                      "at w+ε_i / at w,\neach method up to its best-val epoch", "ratio")]
    full = [*norms, ("ls_ratio", "logit-scale ratio at w+ε_i / at w,\nwhole run (log)",
                     "ratio")]
    for suffix, xmax, panels in (("_early", window, early), ("_full", None, full)):
        fig = plot_curves(df, panels, marks=marks, colors=colors, xmax=xmax,
                          log=("penultimate_activation_norm", "last_layer_weight_norm",
                               "ls_ratio"),
                          robust=("ls_ratio_pre",),
                          title=f"{name}: the mechanism "
                                + (f"up to and past the early-stopping epochs (to epoch "
                                   f"{xmax:.0f})" if xmax else "over the whole run"))
        paths += _save(fig, fig_dir, prefix + "mechanism" + suffix)
    return paths


def upweighting(root, cfg, all_runs, fig_dir: Path) -> list[Path]:
    """Per-example up-weighting vs margin at each run's best-validation epoch."""
    import sam_diagnostics as sd
    from sam_diagnostics.plots import plot_upweighting

    datasets, names = [], []
    for label, sub in cfg:
        for _, r in sub.iterrows():
            idx = int(r["sel_index"])
            if idx < 0:
                continue
            ds = sd.open_run(Path(r["path"]), load=False)
            point = ds[["logit_scale", "margin"]].isel(step=[idx]).load()
            ds.close()
            point = point.assign_coords(step=[0])
            point.attrs = dict(ds.attrs)
            datasets.append(point)
            names.append(f"{label}-{r['seed']}")
    if not datasets:
        return []
    merged = sd.merge_runs(datasets, names=names)
    fig = plot_upweighting(merged, step=0, when="each run's best-validation epoch")
    return _save(fig, fig_dir, "upweighting")


def ablation(df: pd.DataFrame, key: str, title: str, fig_dir: Path, name: str) -> list[Path]:
    if df.empty:
        return []
    d = df.assign(x=df[key].replace({0: 4000}) if key == "n_samples" else df[key])
    d = d.assign(value=d["best_test"])
    fig = plot_ablation(d[["x", "method", "seed", "value"]],
                        xlabel="training pool size" if key == "n_samples" else "hidden width",
                        title=f"{name}: {title} ablation (best test accuracy)")
    return _save(fig, fig_dir, f"ablation_{'size' if key == 'n_samples' else key}")


TOY = (("linear_upweighting", "linear logistic regression: 1-SAM's up-weighting ratio against "
        "the margin, exact (SPEC 2.4)"),
       ("linear_grad_ratio", "linear model: clean/noisy gradient share under SGD and 1-SAM"),
       ("linear_accuracy", "linear model: accuracy over training"),
       ("deep_linear_norms", "two-layer linear network: activation norm, ‖V‖ and test "
        "accuracy (J-SAM = SGD + the SPEC 2.5 penalty)"),
       ("deep_linear_equivalence", "two-layer linear network: the J-SAM = penalized-SGD identity "
        "checked along whole runs"))


def toy_section(docs: Path | None) -> list[str]:
    if docs is None:
        return []
    folder = docs / "figures" / "toy"
    pngs = {p.stem: p for p in folder.glob("*.png")} if folder.exists() else {}
    if not pngs:
        return []
    prov_file = folder / "provenance.json"
    prov = json.loads(prov_file.read_text()) if prov_file.exists() else {}
    made = (" and ".join(f"`{c}`" for c in prov.get("commands", [])) or "the toy scripts")
    made += f" at commit {prov['commit']}" if prov.get("commit") else ""
    made += f" ({prov['note']})" if prov.get("note") else ""
    lines = ["## The linear toy and the two-layer linear network (findings 1 and 3)", "",
             f"The PNGs in `docs/figures/toy/` are copied from {made}.", ""]
    described = [stem for stem, _ in TOY if stem in pngs]
    for stem, text in TOY:
        if stem in pngs:
            lines += [f"{text}:", "", f"![{stem}](figures/toy/{stem}.png)", ""]
    for stem in sorted(set(pngs) - set(described)):
        lines += [f"![{stem}](figures/toy/{stem}.png)", ""]
    return lines

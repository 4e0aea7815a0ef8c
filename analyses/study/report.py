"""Report of the label-noise study: tables, findings and figures, from the finished runs only.

Nothing is hard-coded: every number comes from the stored runs; stages with missing runs are
labelled *partial* (with counts) and a missing stage says so.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from . import figures, tables
from .driver import Study
from .protocol import FINAL_SEEDS, STAGES, TUNE_SEEDS, WEIGHT_DECAY
from .runs import commit, compute_seconds, finished
from .stats import SMOOTH, paired

ROOT = Path(__file__).resolve().parents[2]


def log_invocation(root: Path, argv) -> None:
    """Append the command and commit of a training invocation (the report lists them)."""
    with open(Path(root) / "invocations.jsonl", "a") as f:
        f.write(json.dumps({"commit": commit(), "argv": list(argv),
                            "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                timespec="seconds")}) + "\n")


def _invocations(root: Path) -> list[dict]:
    path = Path(root) / "invocations.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _commits(root: Path) -> list[str]:
    return list(dict.fromkeys(i.get("commit", "?") for i in _invocations(root)))


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


def _where(root: Path) -> str:
    """The study folder relative to the repository (never an absolute machine path)."""
    root = Path(root).resolve()
    if root.is_relative_to(ROOT):
        return str(root.relative_to(ROOT))
    return f"{root.name} (a folder outside the repository)"


# ------------------------------------------------------------------------------ quick study
def quick_report(root: Path, setting, runs, seconds: float) -> dict:
    import sam_diagnostics as sd
    from sam_diagnostics.plots import plot_standard

    df = tables.frame(runs, root)
    configs = [(tables.LABELS[m], df[df["method"] == m]) for m in
               dict.fromkeys(r.optimizer for r in runs)]
    table, _ = tables.comparison(df, configs, df[df["method"] == "sgd"],
                                 df[df["method"] == "sam"], setting=setting.name)
    folder = root / "final" / setting.name
    merged = sd.merge_runs(folder)
    sd.to_netcdf(merged, root / f"{setting.name}.nc", overwrite=True)
    figs = plot_standard(merged, root / "figures" / setting.name)
    text = ["# Quick label-noise study (not tuned)", "",
            f"`python analyses/label_noise.py --quick --out {_where(root)}` "
            f"(this invocation {seconds / 60:.1f} min, commit {commit()}). MNIST-1D, MLP, 30% "
            f"symmetric label noise, {setting.epochs} epochs, ρ = {setting.rho['sam'][0]:g} and "
            f"γ = {setting.gammas[0]:g} fixed from the study notes (no tuning), seeds "
            f"0–{df['seed'].max() if len(df) else 0}. Accuracies in %, mean ± 95% t-interval "
            "half-width over seeds; Δ = paired difference to SGD over seeds [95% interval]. "
            "*best test* looks at the test set (the paper's metric); *test at best-val epoch* "
            f"stops at the peak of the {SMOOTH}-epoch moving average of the noisy validation "
            "accuracy.", "", table, "",
            "The full protocol (tuning on three seeds, five fresh seeds, ablations) is "
            "`docs/reproducing.md`.", ""]
    text += [f"![{p.stem}]({_rel(p, root)})" for p in figs if p.suffix == ".png"]
    path = root / "report.md"
    path.write_text("\n".join(text) + "\n")
    print(table)
    print(f"report: {path}\nruns: {folder}\nfigures: {root / 'figures' / setting.name}")
    return {"table": df, "paths": [path, *figs]}


# ------------------------------------------------------------------------------ full study
def _expected(study: Study, stage: str):
    try:
        return study.final_runs(stage)
    except (TypeError, ValueError, KeyError):  # a choice it needs is not made yet
        return None


def _sel(df: pd.DataFrame, **kw) -> pd.DataFrame:
    out = df
    for key, value in kw.items():
        if key == "gamma":
            out = out[out["gamma"].apply(lambda g, v=value: tuple(g) == tuple(v))]
        else:
            out = out[np.isclose(out[key], value)] if isinstance(value, float) else out[
                out[key] == value]
    return out


def setting_section(root: Path, docs: Path | None, setting):
    """Markdown lines of one setting, its findings (strings) and the per-seed metrics of its
    main comparison (``{label: {metric: {seed: value}}}``, empty before the main runs)."""
    study = Study(root, setting, log=lambda m: None, train=False)
    lines = [f"## {setting.name}", ""]
    if setting.note:
        lines += [f"Note: {setting.note}.", ""]
    choices = {v: study.tune(v) for v in ("sam", "regsgd", "adareg", "lsam", "jsam")}
    status, runs_of = [], {}
    for stage in STAGES:
        if stage.startswith("tune-") or stage in ("size", "width") and not (
                setting.sizes if stage == "size" else setting.widths):
            continue  # size and width ablations belong to MNIST-1D MLP only
        runs = _expected(study, stage) if choices["sam"]["choice"] is not None else None
        if stage == "reg" and choices["regsgd"]["choice"] is None:
            runs = None
        if stage == "ada" and choices["adareg"]["choice"] is None:
            runs = None
        if stage == "var" and (choices["lsam"]["choice"] is None
                               or choices["jsam"]["choice"] is None):
            runs = None
        if runs is None:
            status.append(f"{stage}: not run")
            continue
        done = len(finished(runs, root))
        own = [r for r in runs if r.group != f"final/{setting.name}" or stage in (
            "main", "ada", "reg", "var")]
        if len(finished(own, root)):
            runs_of[stage] = runs
        status.append(f"{stage}: {done}/{len(runs)} runs" + ("" if done == len(runs) else
                                                            " (**partial**)"))
    tune_status = []
    for v, res in choices.items():
        n = sum(row["seeds"] for row in res.get("table", []))
        total = len(res.get("grid", [])) * len(TUNE_SEEDS)
        tune_status.append(f"tune {v}: {n}/{total} runs" + ("" if n == total and total else
                                                            " (**partial**)"))
    lines += ["Stages: " + "; ".join(tune_status + status) + ".", ""]
    all_runs = [r for runs in runs_of.values() for r in runs]
    df = tables.frame(all_runs, root) if all_runs else pd.DataFrame()
    findings: list[str] = []
    fig_dir = (docs / "figures" / "study" / setting.name) if docs else (
        root / "figures" / setting.name)
    base = docs if docs else root
    if fig_dir.exists():  # figures of this setting are all regenerated: no stale files
        shutil.rmtree(fig_dir)

    # tuning
    lines += ["### Tuning (validation only; test data never looked at)", "",
              f"Tuning seeds {', '.join(map(str, TUNE_SEEDS))} (each with its own noisy "
              f"validation split), {setting.tune_epochs} epochs, probe reduced to a few examples. "
              f"Score: peak of the {SMOOTH}-epoch moving average of validation accuracy. Values "
              "within one paired standard error of the best are tied; the tied value nearest "
              "the median grid position of the tied values is chosen (per axis for (γ_a, "
              "γ_V); the earlier one when two are equally near). A "
              "chosen or best-scoring value at an end of its grid extends that axis one geometric "
              "step past the end "
              "(at most twice), so that the chosen value is inside the grid."
              + _tuning_cost(root / "tune" / setting.name), ""]
    for v, res in choices.items():
        if not res.get("table"):
            lines += [f"**{tables.LABELS[v]}**: not run.", ""]
            continue
        edge = res.get("on_edge")
        edge = ("" if not edge else f" — **on the edge of the grid: {edge}**"
                if isinstance(edge, str) else " — **on the edge of the grid**")
        grown = res.get("extended") or {}
        grown = (" (grid extended past the " + ", ".join(
            f"{k} end" + (f" {n}×" if n > 1 else "") for k, n in grown.items()) + ")"
                 if grown else "")
        lines += [f"**{tables.LABELS[v]}**{grown}{edge}:", "", tables.tuning_table(res, v), ""]
    lines += _figure_lines(figures.tuning(choices, fig_dir), base)

    if df.empty or "main" not in runs_of:
        lines += ["No final runs finished yet.", ""]
        return lines, findings, {}
    rho = choices["sam"]["choice"]
    fin = df[df["group"] == f"final/{setting.name}"]
    sgd = _sel(fin, method="sgd", wd=0.0)
    sam = _sel(fin, method="sam", rho=rho, wd=0.0)
    main_cfg = [("SGD", sgd), (tables.label("sam", rho), sam)]
    main_cfg += [(tables.label(v, rho), _sel(fin, method=v, rho=rho)) for v in ("lsam", "jsam")]
    if "reg" in runs_of:
        gamma = choices["regsgd"]["choice"]
        main_cfg.append((tables.label("regsgd", gamma=gamma), _sel(fin, method="regsgd",
                                                                  gamma=tuple(gamma))))
    if "ada" in runs_of:
        ada = choices["adareg"]["choice"]
        for r in dict.fromkeys((ada, rho)):
            tag = "tuned" if r == ada else "1-SAM's"
            main_cfg.append((tables.label("adareg", r) + f" [{tag} ρ]",
                             _sel(fin, method="adareg", rho=r)))
    table, seeds_of = tables.comparison(fin, main_cfg, sgd, sam)
    lines += ["### Main comparison: every SAM variant at 1-SAM's ρ (the paper's ablation)", "",
              f"Fresh seeds {FINAL_SEEDS[0]}–{FINAL_SEEDS[-1]}; {setting.epochs} epochs; test "
              "evaluated every epoch. Accuracies in %: mean ± 95% t-interval half-width; Δ: "
              "paired difference to SGD over seeds [95% interval]. The share of the 1-SAM gap "
              "is printed only where the 1-SAM − SGD interval excludes 0 (best test / at "
              "best-val).", "", table, ""]
    findings += _main_findings(setting.name, seeds_of, main_cfg)
    lines += _figure_lines(figures.comparison(main_cfg, fig_dir, setting.name), base)

    if "var" in runs_of:
        var_cfg = [("SGD", sgd), (tables.label("sam", rho), sam)]
        var_cfg += [(tables.label(v, choices[v]["choice"]) + " [own ρ]",
                     _sel(fin, method=v, rho=choices[v]["choice"])) for v in ("lsam", "jsam")]
        var_table, var_seeds = tables.comparison(fin, var_cfg, sgd, sam)
        lines += ["### Secondary: L-SAM and J-SAM at their own tuned ρ (a practitioner's view)",
                  "", var_table, ""]
        findings += [line for line in _main_findings(setting.name, var_seeds, var_cfg,
                                                      " (own ρ)") if "within noise" not in line]

    mech_cfg = list(main_cfg)
    if "wd" in runs_of:
        wdf = df[df["group"] == f"final/{setting.name}-wd"]
        wd_cfg = [(tables.label("sgd", wd=WEIGHT_DECAY), _sel(wdf, method="sgd")),
                  (tables.label("sam", rho, wd=WEIGHT_DECAY), _sel(wdf, method="sam"))]
        lines += [f"### Weight decay {WEIGHT_DECAY:g} (SGD and 1-SAM, same seeds)", "",
                  tables.comparison(wdf, wd_cfg, wd_cfg[0][1], wd_cfg[1][1])[0], ""]
        mech_cfg += wd_cfg
    lines += ["### The mechanism at each method's early-stopping epoch", "",
              "‖a‖: mean penultimate activation norm over the 256 probe examples; ‖V‖: last-layer "
              "weight norm; both at each run's best-validation epoch and at the end. Logit-scale "
              "ratio: geometric mean over probe examples of ‖δ_i(w+ε_i)‖/‖δ_i(w)‖ (ε_i the 1-SAM "
              f"offset of radius ρ = {rho:g}; the adaptive regularizer at its own ρ uses that), "
              "averaged over the epochs up to "
              "the best-validation epoch. Mean ± 95% interval over seeds.", "",
              tables.mechanism_table(df, mech_cfg), ""]
    findings += _mechanism_findings(setting.name, mech_cfg)
    findings += _extra_findings(setting.name, main_cfg, mech_cfg)
    lines += _figure_lines(figures.curves(root, main_cfg, all_runs, fig_dir, setting.name)
                           + figures.upweighting(root, main_cfg[:4], all_runs, fig_dir), base)
    if "wd" in runs_of:
        lines += _figure_lines(figures.curves(root, [main_cfg[0], main_cfg[1], *mech_cfg[-2:]],
                                              all_runs, fig_dir, setting.name, prefix="wd_"),
                               base)

    for stage, key, title in (("size", "n_samples", "training-pool size"),
                              ("width", "width", "hidden width")):
        if stage not in runs_of:
            continue
        groups = {f"final/{setting.name}", f"final/{setting.name}-{stage}"}
        ab = df[df["group"].isin(groups) & (df["wd"] == 0)
                & df["method"].isin(["sgd", "sam"])]
        ab = ab[(ab["method"] == "sgd") | np.isclose(ab["rho"], rho)]
        ab = ab[ab["seed"].isin(range(3))]
        other = "width" if key == "n_samples" else "n_samples"
        ab = ab[ab[other] == (256 if other == "width" else 0)]
        what = (" (the noisy pool before its 10% validation split; the test set is unchanged)"
                if key == "n_samples" else " (both hidden layers of the MLP)")
        lines += [f"### Ablation: {title} (SGD vs 1-SAM at ρ = {rho:g}, seeds 0–2)", "",
                  f"Varied: {title}{what}; everything else as in the main comparison, "
                  "1-SAM's ρ not retuned.", "",
                  tables.ablation_table(ab, key, title), ""]
        lines += _figure_lines(figures.ablation(ab, key, title, fig_dir, setting.name), base)
        cells = []
        for value, sub in sorted(ab.groupby(key), key=lambda kv: (kv[0] == 0, kv[0])):
            d, ok = tables.diff(_seeds(sub[sub["method"] == "sam"], "best_test"),
                                _seeds(sub[sub["method"] == "sgd"], "best_test"))
            shown = "all" if key == "n_samples" and value == 0 else f"{value:g}"
            cells.append(f"{shown}: {d}" + ("" if ok else " (within noise)"))
        findings.append(f"**{setting.name}, {title} ablation** (1-SAM − SGD best test, 3 seeds): "
                        + "; ".join(cells) + ".")
    return lines, findings, seeds_of


def _tuning_cost(folder: Path) -> str:
    seconds, n, untimed = compute_seconds(folder) if folder.exists() else (0.0, 0, 0)
    if not n:
        return ""
    return (f" Cost of the tuning runs: {n} timed runs, {seconds / 60:.0f} min single-threaded "
            f"({seconds / n:.0f} s per run on average, on a machine shared with other jobs"
            + (f"; {untimed} more finished without a recorded time" if untimed else "")
            + "), with the probe cut to 8 examples.")


def _figure_lines(figs, base) -> list[str]:
    return [f"![{p.stem}]({_rel(p, base)})" for p in figs if p.suffix == ".png"] + [""]


def _side(a: dict, b: dict) -> int:
    """+1 / -1 when the paired interval of ``a - b`` lies above / below 0, else 0."""
    mean, half, n = paired(a, b)
    if n < 2 or not np.isfinite(half) or abs(mean) <= half:
        return 0
    return 1 if mean > 0 else -1


def _verdict(vs_sgd: int, vs_sam: int) -> str:
    """Where a method sits relative to SGD and 1-SAM (signs of the paired intervals)."""
    sgd = {1: "above SGD", -1: "below SGD", 0: "not distinguishable from SGD"}[vs_sgd]
    sam = {1: "above 1-SAM", -1: "below 1-SAM", 0: "not distinguishable from 1-SAM"}[vs_sam]
    if vs_sgd == 1 and vs_sam == -1:
        return "between SGD and 1-SAM"
    if vs_sgd == 0 and vs_sam == 0:
        return "distinguishable from neither"
    return f"{sgd}, {sam}"


def _main_findings(name: str, seeds_of: dict, cfg, what: str = "") -> list[str]:
    out = []
    labels = [lab for lab, _ in cfg]
    sgd, sam = seeds_of.get(labels[0]), seeds_of.get(labels[1])
    if not sgd or not sam:
        return out
    for metric, mname in tables.METRICS.items():
        gap, ok = tables.diff(sam[metric], sgd[metric])
        line = f"**{name}, {mname}{what}**: 1-SAM − SGD = {gap} points"
        if not ok:
            out.append(line + " — the gap is within noise; finding 2 cannot be tested here.")
            continue
        parts = []
        for lab in labels[2:]:
            if lab not in seeds_of:
                continue
            d_sgd = tables.diff(seeds_of[lab][metric], sgd[metric])[0]
            d_sam = tables.diff(seeds_of[lab][metric], sam[metric])[0]
            verdict = _verdict(_side(seeds_of[lab][metric], sgd[metric]),
                               _side(seeds_of[lab][metric], sam[metric]))
            parts.append(f"{lab}: {d_sgd} vs SGD, {d_sam} vs 1-SAM → {verdict}")
        out.append(line + ". " + "; ".join(parts) + ".")
    return out


def _seeds(sub: pd.DataFrame, col: str) -> dict:
    return {int(k): float(v) for k, v in zip(sub["seed"], sub[col])}


def _extra_findings(name: str, main_cfg, mech_cfg) -> list[str]:
    """The adaptive regularizer against the constant penalty, and the weight-decay check of the
    post-memorization reversal."""
    out = []
    by = dict(main_cfg)
    reg = next((sub for lab, sub in main_cfg if lab.startswith(tables.LABELS["regsgd"])), None)
    for lab, sub in main_cfg:
        if not lab.startswith(tables.LABELS["adareg"]) or not len(sub) or reg is None or not len(
                reg):
            continue
        cells = [f"{mname}: {tables.diff(_seeds(sub, k), _seeds(reg, k))[0]}"
                 for k, mname in tables.METRICS.items()]
        out.append(f"**{name}, adaptive vs constant penalty**: {lab} − reg. SGD = "
                   + "; ".join(cells) + " points (paired).")
    wd = [(lab, sub) for lab, sub in mech_cfg if ", wd " in lab]
    labels = [lab for lab, _ in main_cfg]
    if len(wd) == 2 and all(len(sub) for _, sub in wd):
        sgd, sam = by[labels[0]], by[labels[1]]
        key = "last_layer_weight_norm"
        plain = tables.diff(_seeds(sam, f"{key}@end"), _seeds(sgd, f"{key}@end"), scale=1.0)[0]
        decayed = tables.diff(_seeds(wd[1][1], f"{key}@end"), _seeds(wd[0][1], f"{key}@end"),
                              scale=1.0)[0]
        peak = tables.diff(_seeds(sam, f"{key}@sel"), _seeds(sgd, f"{key}@sel"), scale=1.0)[0]
        gain = tables.diff(_seeds(wd[1][1], "test_at_sel"), _seeds(wd[0][1], "test_at_sel"))[0]
        out.append(f"**{name}, after memorization**: 1-SAM − SGD last-layer weight norm is "
                   f"{peak} at the best-val epochs and {plain} at the end without weight decay; "
                   f"with weight decay {WEIGHT_DECAY:g} it is {decayed} at the end. 1-SAM − SGD "
                   f"test accuracy at the best-val epoch with weight decay: {gain} points.")
    return out


def _mechanism_findings(name: str, cfg) -> list[str]:
    out = []
    by = dict(cfg)
    labels = [lab for lab, _ in cfg]
    sam = by.get(labels[1])
    if sam is not None and len(sam):
        c = dict(zip(sam["seed"], sam["ls_ratio_clean@pre"]))
        n = dict(zip(sam["seed"], sam["ls_ratio_noisy@pre"]))
        m, h, k = paired(c, n)
        if k:
            sig = np.isfinite(h) and m - h > 0
            out.append(f"**{name}, finding 1** (1-SAM, up to its best-val epoch): clean/noisy "
                       f"logit-scale ratio difference {m:+.3f} ± {h:.3f} → "
                       + ("clean examples are up-weighted more (reproduces)" if sig else
                          "not resolved"))
    sgd = by.get(labels[0])
    if sgd is not None and len(sgd):
        for lab in labels[1:]:
            sub = by[lab]
            if not len(sub) or "wd" in lab and "wd" not in labels[0]:
                continue
            cells = []
            for key, nm in (("penultimate_activation_norm", "‖a‖"),
                            ("last_layer_weight_norm", "‖V‖")):
                at_sel = tables.diff(dict(zip(sub["seed"], sub[f"{key}@sel"])),
                                     dict(zip(sgd["seed"], sgd[f"{key}@sel"])), scale=1.0)[0]
                at_end = tables.diff(dict(zip(sub["seed"], sub[f"{key}@end"])),
                                     dict(zip(sgd["seed"], sgd[f"{key}@end"])), scale=1.0)[0]
                side = _side(dict(zip(sub["seed"], sub[f"{key}@sel"])),
                             dict(zip(sgd["seed"], sgd[f"{key}@sel"])))
                word = {-1: "smaller at best-val (as the paper)", 1: "larger at best-val "
                        "(not as the paper)", 0: "not resolved at best-val"}[side]
                cells.append(f"{nm} {at_sel} at best-val, {at_end} at the end → {word}")
            out.append(f"**{name}, findings 3–4**, {lab} − SGD: " + "; ".join(cells) + ".")
    return out


def _adareg_note(root: Path) -> list[str]:
    text = ("*Adaptive reg.* (`optimizer=\"adareg\"`, `sam_diagnostics.optim."
            "AdaptiveRegularizedSGD`) is SGD on ℓ_i + ½ sg[ρ/N_i]·(sg[‖δ_i‖²]‖a_i‖² + "
            "sg[‖u_i‖²+1]‖D_i Vᵀ sg[δ_i]‖²): the exact J-SAM step of the top two layers (SPEC 2.5 "
            "with the network below as a fixed feature map u → a = ReLU(W u + c), N_i the norm "
            "of the per-example gradient of those layers), with per-example stop-gradient "
            "weights instead of regularized SGD's constant γ's; one forward and one backward. "
            "On the CNNs the layer below the head is a convolution (per-example gradient "
            "norms do not factor), so only the head's part is matched there: "
            "½ sg[ρ/N_i] sg[‖δ_i‖²] ‖a_i‖² with N_i² = ‖δ_i‖² (‖a_i‖² + 1).")
    cost = Path(root) / "adareg_cost.json"
    if cost.exists():
        data = json.loads(cost.read_text())
        nan = float("nan")
        cells = ", ".join(f"{name}: {r.get('adareg', nan):.2f}× (reg. SGD "
                          f"{r.get('regsgd', nan):.2f}×, 1-SAM {r.get('sam', nan):.2f}×)"
                          for name, r in data.get("ratio_to_sgd", {}).items())
        missed = [name for name, r in data.get("ratio_to_sgd", {}).items()
                  if r.get("adareg", nan) > 1.2]
        text += (f" Step time relative to one SGD step (median of {data.get('steps')} "
                 f"interleaved steps, batch {data.get('batch')}, 1 thread; `python "
                 f"analyses/adareg_cost.py`): {cells}. Target ≤ 1.2×: "
                 + (f"**missed** for {', '.join(missed)} (a fixed ≈ 0.35 ms of small tensor "
                    "operations on a 1.2 ms SGD step), met elsewhere." if missed else "met."))
    return [text, ""]


def full_report(root: Path, docs: Path | None, settings, argv) -> dict:
    text_settings, findings, main = [], [], {}
    for setting in settings:
        lines, f, seeds_of = setting_section(root, docs, setting)
        text_settings += lines
        findings += f
        if seeds_of:
            main[setting.name] = seeds_of
    seconds, n_runs, untimed = compute_seconds(root)
    commits = _commits(root) or [commit()]
    cmd = "python analyses/label_noise.py " + " ".join(argv)
    partial = any("partial" in line or "not run" in line for line in text_settings)
    header = ["# Reproducing the paper at small scale", "",
              f"Generated by `{cmd}` from the runs in `{_where(root)}` "
              f"(never edited by hand). Runs trained by commit(s) {', '.join(commits)}; report "
              f"by commit {commit()}. Compute: {n_runs} timed runs, {seconds / 3600:.2f} h of "
              "single-threaded training in total (2-core CPU shared with other jobs)"
              + (f"; {untimed} more finished run{'s have' if untimed > 1 else ' has'} no "
                 "recorded time (summarized after a restart)" if untimed else "") + ".", ""]
    trained = list(dict.fromkeys(
        "python analyses/label_noise.py " + " ".join(i.get("argv", [])) + f" (commit "
        f"{i.get('commit', '?')}, started {i.get('utc', '?')})" for i in _invocations(root)))
    if trained:
        header += ["Training commands: " + "; ".join(f"`{t.split(' (commit')[0]}`"
                                                     + " (commit" + t.split(" (commit", 1)[1]
                                                     for t in trained) + ".", ""]
    from .protocol import SETTINGS

    missing = [name for name in SETTINGS if name not in {s.name for s in settings}]
    if partial or missing:
        header += ["**This report is partial**: the stages marked *partial* or *not run* below "
                   "have not finished (rerun the training command to resume; finished runs are "
                   "reused)"
                   + (f"; settings not run at all: {', '.join(missing)}" if missing else "")
                   + ".", ""]
    header += _adareg_note(root)
    header += ["Data: 30% symmetric label noise on the training and validation splits; clean "
               "test set. Optimizer: SGD, momentum 0.9, lr 0.05, batch 128, constant lr, no "
               "weight decay unless stated. *best test (paper)* is the best test accuracy over "
               "training (the paper's metric; it looks at the test set); *test at best-val "
               f"epoch* stops at the peak of the {SMOOTH}-epoch moving average of noisy "
               "validation accuracy (what a practitioner can do).", "",
               "## Summary across settings", "",
               "Paired differences over the five final seeds, in accuracy points, every SAM "
               "variant at 1-SAM's tuned ρ, regularized SGD at its tuned (γ_a, γ_V) and the "
               "adaptive regularizer at its tuned ρ: mean [95% interval]; an interval that "
               "contains 0 means *within noise*. Details per setting below.", ""]
    for metric, mname in tables.METRICS.items():
        header += [f"**{mname}**:", "", tables.summary_table(main, metric) if main else
                   "(no final runs yet)", ""]
    header += ["## What reproduces here", ""]
    header += [f"- {line}" for line in findings] or ["- (no final runs yet)"]
    header += ["", "## The paper (CIFAR-10, 30% noise, ResNet-18; secondary readings)", "",
               tables.paper_table(), ""]
    toy = figures.toy_section(docs)
    path = (docs / "reproducing.md") if docs else (root / "report.md")
    path.write_text("\n".join(header + text_settings + toy) + "\n")
    print(path.read_text().split("## The paper")[0])
    print(f"report: {path}")
    return {"path": path}

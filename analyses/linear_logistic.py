"""Finding 1 on linear logistic regression: 1-SAM up-weights the clean (low-loss) examples.

Setting (SPEC 2.4): binary Gaussian mixture in 20 dimensions (``‖μ‖ = 2``, 1,000 training
examples, 30% of them with a flipped label), a linear model ``f(x) = wᵀx`` (no bias, one logit,
``w₀ = 0``) trained in float64 by full-batch gradient descent (ρ = 0) and by full-batch 1-SAM
(``sd.SAM(..., m=1)``: one perturbation ``ε_i`` per example) for several radii ρ.

For this model ``ε_i = −ρ y_i x_i / ‖x_i‖``: the perturbation lowers each margin by ``ρ‖x_i‖``
and leaves the Jacobian ``x_i`` unchanged, so 1-SAM only rescales each example's gradient by

    r_i = σ(ρ‖x_i‖ − m_i) / σ(−m_i),   m_i = y_i wᵀx_i,

which grows with the margin: the well-fitted (mostly clean) examples are up-weighted more than
the badly fitted (mostly noisy) ones. The library measures this as the SAM-view / SGD-view
logit scale of :class:`sam_diagnostics.Probe`; the script asserts it equals the closed form.

Figures (PNG + PDF in ``--out``):

- ``linear_upweighting``: measured ``r_i`` against the margin, clean vs noisy, with the closed
  form (per example and as a curve at typical ``‖x‖``);
- ``linear_grad_ratio``: ``mean‖∇ℓ_i‖(clean) / mean‖∇ℓ_i‖(noisy)`` over training per ρ, for the
  gradients the update uses (at ``w + ε_i``) and at the current weights ``w``;
- ``linear_accuracy``: test accuracy, clean-train accuracy and the fraction of noisy training
  labels fitted (memorization), per ρ.

Numbers: ``linear_logistic_summary.json`` and the long-form ``linear_logistic_curves.csv`` /
``linear_logistic_examples.csv``.

Choice of ρ: the effect is governed by ``ρ‖x‖`` with ``‖x‖ ≈ 4.8`` here, and the largest
up-weighting is ``e^{ρ‖x‖}``. ρ = 0.05 moves a gradient by at most ~27%, which hardly changes the
trajectory; the grid 0.1, 0.2, 0.5, 1.0 spans ``ρ‖x‖`` ≈ 0.5 to 5 (up-weighting up to ×1.6 to
×100), so the trend with ρ is visible while every run still trains.

Usage::

    python analyses/linear_logistic.py --out /tmp/linear [--quick] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib.colors
import matplotlib.ticker
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from tqdm.auto import tqdm

import sam_diagnostics as sd
from sam_diagnostics.data import load_dataset
from sam_diagnostics.models import build_model
from sam_diagnostics.plots import METHOD_PALETTE, save_figure

RHOS = (0.0, 0.1, 0.2, 0.5, 1.0)
QUICK_RHOS = (0.0, 0.2, 1.0)
NOISE = 0.3
LR = 0.2
STEPS = 250
QUICK_STEPS = 30
N_SEEDS = 5
RATIO_TOL = 1e-6  # relative, float64
REPORT_STEPS = (3, 8, 25, 75, 250)
SUBSET_COLORS = {"clean": "#56b4e9", "noisy": "#d55e00"}


# ----------------------------------------------------------------------------- helpers


def sigmoid(t: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (exact in the tails, float64)."""
    t = np.asarray(t, dtype=np.float64)
    out = np.empty_like(t)
    pos = t >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-t[pos]))
    e = np.exp(t[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def closed_form_ratio(rho: float, x_norm: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """SPEC 2.4: ``σ(ρ‖x‖ − m) / σ(−m)``, the 1-SAM / GD logit-scale ratio of a linear model."""
    return sigmoid(rho * np.asarray(x_norm) - margin) / sigmoid(-np.asarray(margin))


def rho_label(rho: float) -> str:
    if rho == 0:
        return "GD (ρ = 0)"
    return f"1-SAM ρ = {rho:g}"


def rho_palette(rhos) -> dict[str, str]:
    """GD in the library's SGD colour, 1-SAM radii as light-to-dark shades of its SAM colour."""
    sam_rhos = [r for r in rhos if r > 0]
    shades = sns.light_palette(METHOD_PALETTE["sam"], n_colors=len(sam_rhos) + 2)[2:]
    palette = {rho_label(0.0): METHOD_PALETTE["sgd"]} if 0.0 in rhos else {}
    for r, c in zip(sam_rhos, shades):
        palette[rho_label(r)] = matplotlib.colors.to_hex(c)
    return palette


def make_model() -> torch.nn.Module:
    """``f(x) = wᵀx`` in float64: the zoo's linear model with its bias frozen at 0, ``w₀ = 0``.

    Frozen parameters are not perturbed by SAM (SPEC 2.1), so ``ε_i`` only moves ``w``.
    """
    model = build_model("linear", (20,), 2, binary_head=True, seed=0).double()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    model.head.bias.requires_grad_(False)
    return model


def record_steps(steps: int, n: int = 50) -> list[int]:
    """Step 0 and about ``n`` log-spaced steps up to ``steps`` (every step early on)."""
    grid = np.unique(np.round(np.geomspace(1, steps, n)).astype(int))
    return [0, *grid.tolist()]


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if len(y) == 0:
        return float("nan")
    with torch.no_grad():
        pred = (model(x).reshape(-1) > 0).long()
    return (pred == y).double().mean().item()


# ----------------------------------------------------------------------------- one run


def train_one(rho: float, seed: int, steps: int, lr: float, snapshot_step: int, bar) -> dict:
    """Full-batch GD (ρ = 0) or 1-SAM on the noisy Gaussian mixture; diagnostics on the way."""
    splits = load_dataset("gaussian", noise=NOISE, seed=seed, val_fraction=0.0)
    train, test = splits.train, splits.test
    x, y = train.inputs.double(), train.labels
    noisy = train.is_noisy.numpy()
    x_norm = x.norm(dim=1).numpy()
    xt, yt = test.inputs.double(), test.labels

    model = make_model()
    base = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    # rho = 0 is plain GD: the same optimizer with a zero perturbation (checked below)
    opt = sd.SAM(model, base, rho=rho, m=1, variant="sam") if rho > 0 else sd.SGDStep(model, base)
    probe = sd.Probe(model)
    when = set(record_steps(steps))

    rows, max_err, snapshot = [], 0.0, None
    for step in range(steps + 1):
        if step in when:
            ds = probe.measure(x, y, rho=rho, m=1, is_noisy=noisy,
                               true_labels=train.true_labels.numpy())
            scale = ds["logit_scale"]
            measured = (scale.sel(view="sam") / scale.sel(view="sgd")).values
            m = ds["margin"].sel(view="sgd").values
            closed = closed_form_ratio(rho, x_norm, m)
            err = float(np.max(np.abs(measured / closed - 1.0)))
            if rho > 0:  # the SAM view's margin is lower by exactly rho * ||x|| (SPEC 2.4)
                shift = m - ds["margin"].sel(view="sam").values
                err = max(err, float(np.max(np.abs(shift / (rho * x_norm) - 1.0))))
            max_err = max(max_err, err)
            g = ds["grad_norm"]
            row = {
                "rho": rho, "seed": seed, "step": step,
                "grad_ratio_update": float(g.sel(view="sam").values[~noisy].mean()
                                           / g.sel(view="sam").values[noisy].mean()),
                "grad_ratio_at_w": float(g.sel(view="sgd").values[~noisy].mean()
                                         / g.sel(view="sgd").values[noisy].mean()),
                "mean_upweight_clean": float(measured[~noisy].mean()),
                "mean_upweight_noisy": float(measured[noisy].mean()),
                "mean_margin_clean": float(m[~noisy].mean()),
                "mean_margin_noisy": float(m[noisy].mean()),
                "train_loss": float(ds["loss"].sel(view="sgd").mean()),
                "test_accuracy": accuracy(model, xt, yt),
                "clean_train_accuracy": accuracy(model, x[~noisy], y[~noisy]),
                "noisy_train_accuracy": accuracy(model, x[noisy], y[noisy]),
                "weight_norm": float(ds["last_layer_weight_norm"]),
                "ratio_max_rel_error": err,
            }
            rows.append(row)
            if step == snapshot_step:
                snapshot = pd.DataFrame({
                    "rho": rho, "seed": seed, "step": step, "example": ds["example"].values,
                    "subset": np.where(noisy, "noisy", "clean"), "margin": m,
                    "x_norm": x_norm, "measured_ratio": measured, "closed_form_ratio": closed,
                })
        if step < steps:
            opt.step(x, y)
            bar.update(1)
    return {"rows": rows, "max_err": max_err, "snapshot": snapshot}


# ----------------------------------------------------------------------------- figures


def _plain_log_ticks(ax, lo: float, hi: float) -> None:
    """Log y axis with plain numbers (1.2, 2, 10) and enough ticks for a short range."""
    subs = (1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 7.0) if hi / lo < 10 else (1.0, 2.0, 5.0)
    if hi / lo > 300:
        subs = (1.0,)
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def figure_upweighting(snap: pd.DataFrame, rhos, max_err: float, step: int) -> Figure:
    panels = [r for r in rhos if r > 0]
    fig = Figure(figsize=(3.3 * len(panels) + 1.9, 6.0), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False, sharex="col",
                        gridspec_kw={"height_ratios": [2.2, 1]})
    seed = snap["seed"].min()
    for col, rho in enumerate(panels):
        ax, ax_err = axes[0, col], axes[1, col]
        d = snap[(snap["rho"] == rho) & (snap["seed"] == seed)]
        rel = np.abs(d["measured_ratio"] / d["closed_form_ratio"] - 1.0).clip(lower=1e-17)
        for subset in ("clean", "noisy"):
            mask = d["subset"] == subset
            s = d[mask]
            ax.scatter(s["margin"], s["measured_ratio"], s=9, alpha=0.55, lw=0,
                       color=SUBSET_COLORS[subset], rasterized=True)
            ax_err.scatter(s["margin"], rel[mask], s=6, alpha=0.5, lw=0,
                           color=SUBSET_COLORS[subset], rasterized=True)
        lo, hi = d["margin"].min(), d["margin"].max()
        pad = 0.05 * (hi - lo + 1e-9)
        grid = np.linspace(lo - pad, hi + pad, 200)
        for q, style in ((0.5, "-"), (0.05, ":"), (0.95, ":")):
            norm = float(np.quantile(d["x_norm"], q))
            ax.plot(grid, closed_form_ratio(rho, norm, grid), style, color="0.2", lw=1)
        ax.set_yscale("log")
        _plain_log_ticks(ax, *ax.get_ylim())
        means = d.groupby("subset")["measured_ratio"].mean()
        ax.set_title(f"ρ = {rho:g}  (ρ·median‖x‖ = {rho * d['x_norm'].median():.2f})\n"
                     f"mean $r_i$: clean {means['clean']:.2f}, noisy {means['noisy']:.2f}",
                     fontsize=9.5)
        ax_err.set_yscale("log")
        ax_err.axhline(RATIO_TOL, color="#cc0000", lw=0.8, ls="--")
        ax_err.set_ylim(1e-17, 1e-4)
        ax_err.set_xlabel("margin $m_i = y_i\\,w^\\top x_i$ at $w$")
    axes[0, 0].set_ylabel("up-weighting $r_i$ (log scale)\n"
                          "= logit scale at $w+ε_i$ / at $w$")
    axes[1, 0].set_ylabel("per example:\n|measured / closed form − 1|")
    handles = [
        Line2D([], [], ls="none", marker="o", color=SUBSET_COLORS["clean"], label="clean label"),
        Line2D([], [], ls="none", marker="o", color=SUBSET_COLORS["noisy"], label="noisy label"),
        Line2D([], [], color="0.2", label="closed form\nσ(ρ‖x‖−m)/σ(−m)\nat median ‖x‖"),
        Line2D([], [], color="0.2", ls=":", label="… at 5% / 95%\nquantile of ‖x‖"),
        Line2D([], [], color="#cc0000", ls="--", label=f"tolerance {RATIO_TOL:g}\n(asserted)"),
    ]
    fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=8.5)
    fig.suptitle(
        "1-SAM up-weights the well-fitted (mostly clean) examples: ratio measured by sd.Probe vs "
        f"closed form (SPEC 2.4)\nexamples of each 1-SAM run at step {step} (seed {seed}); "
        f"max relative error over all recorded steps, ρ and seeds: {max_err:.1e}",
        fontsize=10.5)
    return fig


def figure_grad_ratio(df: pd.DataFrame, palette: dict, n_seeds: int) -> Figure:
    fig = Figure(figsize=(10.5, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    long = df[df["step"] > 0]
    titles = {
        "grad_ratio_update": "gradients the update uses (at $w + ε_i$)",
        "grad_ratio_at_w": "gradients at the current weights $w$",
    }
    for ax, (var, title) in zip(axes, titles.items()):
        sns.lineplot(data=long, x="step", y=var, hue="method", hue_order=list(palette),
                     palette=palette, errorbar="sd" if n_seeds > 1 else None, legend=ax is axes[0],
                     err_kws={"alpha": 0.15, "linewidth": 0}, lw=1.6, ax=ax)
        ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("full-batch step (log scale)")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel(r"mean $\|\nabla\ell_i\|$ clean / mean $\|\nabla\ell_i\|$ noisy")
    sns.move_legend(axes[0], "lower left", title=None, fontsize=8.5, frameon=False)
    seeds = f"mean ± sd over {n_seeds} label-noise seeds" if n_seeds > 1 else "one seed"
    fig.suptitle("Clean vs noisy gradient norm over training, linear logistic regression, "
                 f"30% label noise ({seeds})", fontsize=10.5)
    return fig


def figure_accuracy(df: pd.DataFrame, palette: dict, n_seeds: int) -> Figure:
    fig = Figure(figsize=(13.5, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    long = df[df["step"] > 0].copy()
    panels = {
        "test_accuracy": "test accuracy (clean labels)",
        "clean_train_accuracy": "train accuracy, clean examples",
        "noisy_train_accuracy": "noisy labels fitted (memorization)",
    }
    for ax, (var, title) in zip(axes, panels.items()):
        long[var + "_pct"] = 100 * long[var]
        sns.lineplot(data=long, x="step", y=var + "_pct", hue="method", hue_order=list(palette),
                     palette=palette, errorbar="se" if n_seeds > 1 else None,
                     legend=ax is axes[0], err_kws={"alpha": 0.15, "linewidth": 0}, lw=1.6,
                     ax=ax)
        ax.set_xscale("log")
        ax.set_xlabel("full-batch step (log scale)")
        ax.set_ylabel(f"{title} (%)")
        if var == "test_accuracy":
            mean = long.groupby(["method", "step"])[var + "_pct"].mean().reset_index()
            for label, color in palette.items():
                d = mean[mean["method"] == label]
                if d.empty:
                    continue
                best = d.loc[d[var + "_pct"].idxmax()]
                ax.plot(best["step"], best[var + "_pct"], marker="*", ms=10, color=color,
                        mec="white", mew=0.6, zorder=5)
            peaks = mean.loc[mean.groupby("method")[var + "_pct"].idxmax(), "step"]
            where = (f"step {int(peaks.iloc[0])} for every run" if peaks.nunique() == 1
                     else "early-stopping point")
            ax.set_title(f"test accuracy (★ = peak of the mean: {where})", fontsize=10)
            lo = max(long[var + "_pct"].min(), 85)
            ax.set_ylim(lo, None)
        else:
            ax.set_title(title, fontsize=10)
    sns.move_legend(axes[0], "lower right", title=None, fontsize=8.5, frameon=False)
    seeds = (f"mean ± s.e.m. over {n_seeds} label-noise seeds" if n_seeds > 1
             else "one seed")
    fig.suptitle("Linear logistic regression, Gaussian mixture, 30% label noise: "
                 f"GD vs 1-SAM ({seeds})", fontsize=10.5)
    return fig


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Linear logistic regression under 30% label noise: 1-SAM's per-example "
                    "up-weighting measured by sam_diagnostics vs its closed form, the clean/noisy "
                    "gradient ratio and test accuracy over training (SPEC 2.4, finding 1).")
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke-test size: {QUICK_STEPS} steps, ρ in {QUICK_RHOS}, one seed")
    p.add_argument("--seed", type=int, default=0,
                   help="first label-noise seed (seeds S, S+1, ... are run)")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"number of seeds (default {N_SEEDS}, 1 with --quick)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"full-batch steps (default {STEPS}, {QUICK_STEPS} with --quick)")
    p.add_argument("--lr", type=float, default=LR, help="learning rate (default %(default)s)")
    p.add_argument("--rhos", type=float, nargs="+", default=None,
                   help=f"radii, 0 = GD (default {' '.join(map(str, RHOS))})")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the analysis; return the key numbers (also written to the summary JSON)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    n_seeds = args.seeds or (1 if args.quick else N_SEEDS)
    rhos = tuple(sorted(set(args.rhos or (QUICK_RHOS if args.quick else RHOS))))
    seeds = [args.seed + i for i in range(n_seeds)]
    snapshot_step = min(record_steps(steps), key=lambda s: abs(s - max(1, steps // 20)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results = []
    with tqdm(total=len(rhos) * len(seeds) * steps, desc="linear logistic", unit="step",
              disable=args.no_progress) as bar:
        for rho in rhos:
            for seed in seeds:
                bar.set_postfix(rho=rho, seed=seed)
                results.append(train_one(rho, seed, steps, args.lr, snapshot_step, bar))

    df = pd.DataFrame([r for res in results for r in res["rows"]])
    df["method"] = df["rho"].map(rho_label)
    snap = pd.concat([r["snapshot"] for r in results], ignore_index=True)
    max_err = max(r["max_err"] for r in results)
    print(f"max relative error, measured 1-SAM up-weighting vs closed form σ(ρ‖x‖−m)/σ(−m): "
          f"{max_err:.3e} (over {len(df)} measurements of {len(snap) // len(results)} examples)")
    assert max_err < RATIO_TOL, f"measured up-weighting differs from SPEC 2.4: {max_err:.3e}"

    palette = rho_palette(rhos)
    paths = []
    paths += save_figure(figure_upweighting(snap, rhos, max_err, snapshot_step), out,
                         "linear_upweighting")
    paths += save_figure(figure_grad_ratio(df, palette, n_seeds), out, "linear_grad_ratio")
    paths += save_figure(figure_accuracy(df, palette, n_seeds), out, "linear_accuracy")

    # ---- key numbers
    mean = df.groupby(["rho", "step"]).mean(numeric_only=True).reset_index()
    report_steps = [s for s in REPORT_STEPS if s <= steps]
    if steps not in report_steps:
        report_steps.append(steps)
    final = df[df["step"] == steps].pivot(index="rho", columns="seed", values="test_accuracy")
    per_rho = {}
    for rho in rhos:
        d = mean[mean["rho"] == rho].set_index("step")
        at = {s: d.index[np.abs(d.index - s).argmin()] for s in report_steps}
        peak_step = int(d["test_accuracy"].idxmax())
        per_rho[f"{rho:g}"] = {
            "grad_ratio_update": {str(s): round(float(d.loc[at[s], "grad_ratio_update"]), 4)
                                  for s in report_steps},
            "grad_ratio_at_w": {str(s): round(float(d.loc[at[s], "grad_ratio_at_w"]), 4)
                                for s in report_steps},
            "peak_test_accuracy": float(d["test_accuracy"].max()),
            "peak_step": peak_step,
            "final_test_accuracy": float(d["test_accuracy"].iloc[-1]),
            "final_noisy_train_accuracy": float(d["noisy_train_accuracy"].iloc[-1]),
            "final_clean_train_accuracy": float(d["clean_train_accuracy"].iloc[-1]),
            "seeds_with_final_test_accuracy_above_gd": int(
                (final.loc[rho] > final.loc[0.0]).sum()) if 0.0 in rhos else None,
            "mean_upweight_clean_at_snapshot": float(
                snap[snap["rho"] == rho].query("subset == 'clean'")["measured_ratio"].mean()),
            "mean_upweight_noisy_at_snapshot": float(
                snap[snap["rho"] == rho].query("subset == 'noisy'")["measured_ratio"].mean()),
        }
    # "decays more slowly for larger rho": at every recorded step > 0, is the ratio larger
    # for every larger rho (seed means)?
    wide_u = mean[mean["step"] > 0].pivot(index="step", columns="rho", values="grad_ratio_update")
    wide_w = mean[mean["step"] > 0].pivot(index="step", columns="rho", values="grad_ratio_at_w")
    summary = {
        "config": {"dataset": "gaussian", "noise": NOISE, "model": "linear, no bias, w0 = 0",
                   "optimizer": "full-batch GD / 1-SAM (m=1)", "lr": args.lr, "steps": steps,
                   "rhos": list(rhos), "seeds": seeds, "dtype": "float64",
                   "snapshot_step": snapshot_step},
        "ratio_max_rel_error": max_err,
        "ratio_tolerance": RATIO_TOL,
        "update_grad_ratio_increases_with_rho_at_every_step": bool(
            (np.diff(wide_u.values, axis=1) > 0).all()),
        "at_w_grad_ratio_increases_with_rho_at_every_step": bool(
            (np.diff(wide_w.values, axis=1) > 0).all()),
        "per_rho": per_rho,
        "figures": [str(p) for p in paths],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    df.to_csv(out / "linear_logistic_curves.csv", index=False)
    snap.to_csv(out / "linear_logistic_examples.csv", index=False)
    (out / "linear_logistic_summary.json").write_text(json.dumps(summary, indent=2))

    # ---- printed summary
    print(f"\nGD vs 1-SAM, {len(seeds)} seed(s), {steps} steps, lr {args.lr} "
          f"({summary['seconds']} s)")
    head = "  ".join(f"s={s:>4}" for s in report_steps)
    print(f"clean/noisy mean grad-norm ratio, update gradients (at w+ε_i):   {head}")
    for rho in rhos:
        v = per_rho[f"{rho:g}"]["grad_ratio_update"]
        print(f"  ρ={rho:<4g}" + " " * 52 + "  ".join(f"{v[str(s)]:6.3f}" for s in report_steps))
    print(f"clean/noisy mean grad-norm ratio, at w:                          {head}")
    for rho in rhos:
        v = per_rho[f"{rho:g}"]["grad_ratio_at_w"]
        print(f"  ρ={rho:<4g}" + " " * 52 + "  ".join(f"{v[str(s)]:6.3f}" for s in report_steps))
    print("update-gradient ratio larger for larger ρ at every step: "
          f"{summary['update_grad_ratio_increases_with_rho_at_every_step']}; "
          "at-w ratio larger for larger ρ at every step: "
          f"{summary['at_w_grad_ratio_increases_with_rho_at_every_step']}")
    print("test accuracy (seed mean):")
    for k, v in per_rho.items():
        better = v["seeds_with_final_test_accuracy_above_gd"]
        print(f"  ρ={k:<4} peak {100 * v['peak_test_accuracy']:.1f}% @ step {v['peak_step']:<4} "
              f"final {100 * v['final_test_accuracy']:.1f}%   noisy labels fitted "
              f"{100 * v['final_noisy_train_accuracy']:.1f}%"
              + (f"   final > GD in {better}/{len(seeds)} seeds"
                 if better is not None and k != "0" else ""))
    print(f"up-weighting at step {snapshot_step} (mean r_i clean / noisy): " + "; ".join(
        f"ρ={k}: {v['mean_upweight_clean_at_snapshot']:.3f} / "
        f"{v['mean_upweight_noisy_at_snapshot']:.3f}" for k, v in per_rho.items() if k != "0"))
    print(f"max relative error vs closed form: {max_err:.3e} (< {RATIO_TOL:g})")
    print(f"figures and numbers in {out}")
    return summary


if __name__ == "__main__":
    main()

"""Finding 3 on two-layer linear networks: J-SAM is SGD plus an activation / last-layer penalty.

For ``f(x) = V W x`` (SPEC 2.5) the perturbed Jacobian of 1-SAM's J-SAM variant is exactly the
gradient of an explicit penalty, because ``f`` is bilinear in ``(W, V)``. With the logit term
``δ = ∂ℓ/∂z`` under stop-gradient ``sg``:

- binary head (one logit ``f = vᵀWx``, ``s = ±1``), ``λ = ρ σ(−s f) / ‖∇_w f‖``:
  ``ℓ + sg[λ] · ½ (‖x‖² ‖v‖² + ‖Wx‖²)``  with ``‖∇_w f‖² = ‖Wx‖² + ‖x‖² ‖v‖²``;
- multiclass, ``N = sqrt(‖δ‖² ‖Wx‖² + ‖Vᵀδ‖² ‖x‖²)`` (also a constant):
  ``ℓ + (ρ/N) · ½ (‖x‖² ‖Vᵀ sg[δ]‖² + ‖sg[δ]‖² ‖Wx‖²)``.

This script implements that objective with autograd (:func:`explicit_objective`) and checks,
along whole mini-batch SGD runs in float64, that

1. at every step J-SAM's gradient (``sd.SAM(..., variant="jsam", m=1).gradient``) equals the
   gradient of the explicit objective at the same weights (max relative difference, asserted
   below ``1e-6``), and
2. a J-SAM run and an SGD run on the explicit objective from the same initialization and the
   same mini-batches end at the same weights (relative parameter difference reported and
   asserted).

It then shows what the penalty does (SPEC finding 3): the penultimate activation norm
``‖W x_i‖`` (mean over training examples, ``activation_norm`` of the head input measured by
``sd.Probe``) and the last-layer weight norm ``‖V‖_F`` stay smaller under 1-SAM and J-SAM than
under SGD. Two problems, 30% symmetric label noise: the binary Gaussian mixture (one logit) and
scikit-learn digits (10 classes, 64 features).

Choice of ρ: SAM's ρ is a radius in parameter space, so the useful range depends on the scale of
the weights and inputs. Per problem, ρ is the largest value of {0.05, 0.1, 0.2, 0.5} whose
1-SAM run still trains (ρ = 0.2 on the Gaussian mixture and 0.5 on digits drive the weights to
zero and the test accuracy to chance): 0.1 on the Gaussian mixture, 0.2 on digits.

Figures (PNG + PDF in ``--out``): ``deep_linear_norms`` (activation norm, ‖V‖ and test accuracy
over training per method) and ``deep_linear_equivalence`` (the two checks over training).
Numbers: ``deep_linear_summary.json`` and ``deep_linear_curves.csv``.

Usage::

    python analyses/deep_linear.py --out /tmp/deep_linear [--quick] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import pandas as pd
import seaborn as sns
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from tqdm.auto import tqdm

import sam_diagnostics as sd
from sam_diagnostics.data import load_dataset
from sam_diagnostics.models import build_model
from sam_diagnostics.plots import METHOD_LABELS, METHOD_PALETTE, save_figure

NOISE = 0.3
GRAD_TOL = 1e-6  # relative, float64, per step
PARAM_TOL = 1e-6  # relative, float64, whole trajectory

#: The two problems: data set, head, hidden width, SAM radius, SGD settings.
PROBLEMS = {
    "gaussian": {"title": "Gaussian mixture, binary head (20 → 32 → 1)", "num_classes": 2,
                 "binary": True, "width": 32, "rho": 0.1, "lr": 0.05, "batch": 64,
                 "epochs": 40},
    "digits": {"title": "digits, 10 classes (64 → 32 → 10)", "num_classes": 10,
               "binary": False, "width": 32, "rho": 0.2, "lr": 0.05, "batch": 64,
               "epochs": 40},
}
QUICK_EPOCHS = 2

#: Methods, in plotting order. "explicit" = SGD on the SPEC 2.5 objective.
METHODS = ("sgd", "sam", "jsam", "explicit")
LABELS = {
    "sgd": METHOD_LABELS["sgd"],
    "sam": "1-SAM",
    "jsam": METHOD_LABELS["jsam"],
    "explicit": "SGD + J-SAM's penalty (SPEC 2.5)",
}
PALETTE = {
    "sgd": METHOD_PALETTE["sgd"],
    "sam": METHOD_PALETTE["sam"],
    "jsam": METHOD_PALETTE["jsam"],
    # an explicit penalty on activations and last-layer weights: the regularized-SGD colour
    "explicit": METHOD_PALETTE["regsgd"],
}
DASHES = {"sgd": "", "sam": "", "jsam": "", "explicit": (3, 2)}
#: J-SAM is drawn wide so that it stays visible under the (identical) explicit-penalty run.
WIDTHS = {"sgd": 1.7, "sam": 1.7, "jsam": 3.4, "explicit": 1.5}
#: Colours of the two problems in the equivalence figure (they are not methods).
PROBLEM_COLORS = {"gaussian": "#009e73", "digits": "#555555"}


# ----------------------------------------------------------------------------- the objective


def explicit_objective(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                       rho: float) -> torch.Tensor:
    """Mean over the batch of SPEC 2.5's regularized loss of ``f(x) = V W x``.

    The penalty's coefficient (``λ_i``, resp. ``ρ / N_i`` and ``δ_i``) is computed under
    ``torch.no_grad`` — the stop-gradient ``sg`` — so autograd differentiates only the squared
    norms ``‖x‖²‖v‖²``, ``‖Wx‖²`` and ``‖Vᵀδ‖²``. Its gradient is J-SAM's update direction.
    """
    W, V = model.fc1.weight, model.head.weight
    x = x.flatten(1)
    a = x @ W.T  # the head's input, W x
    z = a @ V.T  # the logits, V W x
    x2 = x.pow(2).sum(1)
    a2 = a.pow(2).sum(1)
    if z.shape[1] == 1:  # binary: f = v^T W x, labels {0, 1} -> s = +-1
        f = z[:, 0]
        s = 2 * y.to(f.dtype) - 1
        loss = F.softplus(-s * f)
        v2 = V.pow(2).sum()
        with torch.no_grad():
            lam = rho * torch.sigmoid(-s * f) / torch.sqrt(a2 + x2 * v2)
        penalty = lam * 0.5 * (x2 * v2 + a2)
    else:
        loss = F.cross_entropy(z, y, reduction="none")
        with torch.no_grad():
            delta = torch.softmax(z, 1) - F.one_hot(y, z.shape[1]).to(z.dtype)
            d2 = delta.pow(2).sum(1)
            norm = torch.sqrt(d2 * a2 + (delta @ V).pow(2).sum(1) * x2)
        vtd2 = (delta @ V).pow(2).sum(1)  # ||V^T sg[delta]||^2, differentiable in V
        penalty = rho / norm * 0.5 * (x2 * vtd2 + d2 * a2)
    return (loss + penalty).mean()


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return flat([p.detach() for p in model.parameters()]).clone()


# ----------------------------------------------------------------------------- training


def accuracy(model, x, y, binary: bool) -> float:
    if len(y) == 0:
        return float("nan")
    with torch.no_grad():
        z = model(x)
        pred = (z[:, 0] > 0).long() if binary else z.argmax(1)
    return (pred == y).double().mean().item()


def train_problem(name: str, cfg: dict, seed: int, epochs: int, bar) -> dict:
    """All four methods on one problem, same init and same mini-batches."""
    splits = load_dataset(name, noise=NOISE, seed=seed)
    train, test = splits.train, splits.test
    x, y = train.inputs.double(), train.labels
    noisy = train.is_noisy.numpy()
    xt, yt = test.inputs.double(), test.labels
    binary, rho, lr, batch = cfg["binary"], cfg["rho"], cfg["lr"], cfg["batch"]
    init = build_model("two_layer_linear", splits.input_shape, cfg["num_classes"],
                       width=cfg["width"], binary_head=binary, seed=seed).double()
    n_batches = -(-len(x) // batch)

    rows, grad_diffs, trajectories = [], [], {}
    for method in METHODS:
        model = copy.deepcopy(init)
        base = torch.optim.SGD(model.parameters(), lr=lr)
        if method == "sgd":
            opt = sd.SGDStep(model, base)
        elif method in ("sam", "jsam"):
            opt = sd.SAM(model, base, rho=rho, m=1, variant=method)
        else:
            opt = None
        probe = sd.Probe(model)
        order = torch.Generator().manual_seed(seed)  # the same batches for every method
        snapshots = []
        step = 0
        for epoch in range(epochs + 1):
            ds = probe.measure(x, y, rho=rho, m=1, is_noisy=noisy)
            act = ds["activation_norm"].sel(view="sgd", layer="head").values
            rows.append({
                "problem": name, "method": method, "epoch": epoch, "step": step,
                "activation_norm": float(act.mean()),
                "activation_norm_clean": float(act[~noisy].mean()),
                "activation_norm_noisy": float(act[noisy].mean()),
                "last_layer_weight_norm": float(ds["last_layer_weight_norm"]),
                "first_layer_weight_norm": float(ds["weight_norm"].sel(module="fc1")),
                "train_loss": float(ds["loss"].sel(view="sgd").mean()),
                "test_accuracy": accuracy(model, xt, yt, binary),
                "clean_train_accuracy": accuracy(model, x[~noisy], y[~noisy], binary),
                "noisy_train_accuracy": accuracy(model, x[noisy], y[noisy], binary),
            })
            snapshots.append(flat_params(model))
            if epoch == epochs:
                break
            perm = torch.randperm(len(x), generator=order)
            for i in range(n_batches):
                idx = perm[i * batch:(i + 1) * batch]
                xb, yb = x[idx], y[idx]
                if method == "jsam":  # check 1: J-SAM's gradient vs the explicit objective's
                    g_jsam, _ = opt.gradient(xb, yb)
                    params = dict(model.named_parameters())
                    g_reg = torch.autograd.grad(explicit_objective(model, xb, yb, rho),
                                                list(params.values()))
                    g_loss = torch.autograd.grad(F.softplus(-(2 * yb - 1) * model(xb)[:, 0])
                                                 .mean() if binary else
                                                 F.cross_entropy(model(xb), yb),
                                                 list(params.values()))
                    a, b, c = flat([g_jsam[n] for n in params]), flat(g_reg), flat(g_loss)
                    grad_diffs.append({"problem": name, "step": step, "epoch": step / n_batches,
                                       "rel_diff": float((a - b).norm() / b.norm()),
                                       # how much the penalty changes the step (non-vacuous check)
                                       "penalty_share": float((b - c).norm() / c.norm())})
                if method == "explicit":
                    base.zero_grad()
                    explicit_objective(model, xb, yb, rho).backward()
                    base.step()
                else:
                    opt.step(xb, yb)
                step += 1
                bar.update(1)
        trajectories[method] = torch.stack(snapshots)

    # check 2: the J-SAM and explicit-objective trajectories
    jsam, explicit = trajectories["jsam"], trajectories["explicit"]
    param_diff = ((jsam - explicit).norm(dim=1) / jsam.norm(dim=1)).numpy()
    return {"rows": rows, "grad_diffs": grad_diffs, "param_diff": param_diff,
            "n_batches": n_batches}


# ----------------------------------------------------------------------------- figures


def figure_norms(df: pd.DataFrame, problems: dict) -> Figure:
    columns = {
        "activation_norm": "mean penultimate activation\nnorm $\\|W x_i\\|$ (train set)",
        "last_layer_weight_norm": "last-layer weight norm $\\|V\\|_F$",
        "test_accuracy": "test accuracy (%)",
    }
    fig = Figure(figsize=(12.5, 3.3 * len(problems) + 0.6), layout="constrained")
    axes = fig.subplots(len(problems), len(columns), squeeze=False)
    data = df.assign(test_accuracy=100 * df["test_accuracy"])
    for row, (name, cfg) in enumerate(problems.items()):
        d = data[data["problem"] == name]
        for col, (var, ylabel) in enumerate(columns.items()):
            ax = axes[row, col]
            for m in METHODS:
                sns.lineplot(data=d[d["method"] == m], x="epoch", y=var, color=PALETTE[m],
                             lw=WIDTHS[m], ls=(0, DASHES[m]) if DASHES[m] else "-",
                             legend=False, ax=ax)
            ax.set_ylabel(ylabel)
            ax.set_xlabel("epoch")
            if col == 0:
                ax.set_title(f"{cfg['title']}, ρ = {cfg['rho']:g}", loc="left", fontsize=10)
            if var != "test_accuracy":
                ax.set_ylim(0, None)
    handles = [Line2D([], [], color=PALETTE[m], lw=WIDTHS[m],
                      ls=(0, DASHES[m]) if DASHES[m] else "-", label=LABELS[m])
               for m in METHODS]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(METHODS), frameon=False)
    fig.suptitle("Two-layer linear networks, 30% label noise, mini-batch SGD: 1-SAM and J-SAM "
                 "keep the activations ‖Wx‖ and the last layer ‖V‖ small\n(J-SAM and SGD on its "
                 "explicit penalty follow the same trajectory: the dashed line lies on the green "
                 "one)", fontsize=10.5)
    return fig


def figure_equivalence(grads: pd.DataFrame, params: pd.DataFrame, problems: dict) -> Figure:
    fig = Figure(figsize=(11.5, 3.8), layout="constrained")
    ax_g, ax_p = fig.subplots(1, 2)
    for name, cfg in problems.items():
        label = cfg["title"].split(",")[0]
        g = grads[grads["problem"] == name]
        ax_g.plot(g["epoch"], g["rel_diff"].clip(lower=1e-18), lw=0.8, alpha=0.8,
                  color=PROBLEM_COLORS[name], label=label)
        p = params[params["problem"] == name]
        ax_p.plot(p["epoch"], p["rel_diff"].clip(lower=1e-18), lw=1.4, marker="o", ms=2.5,
                  color=PROBLEM_COLORS[name], label=label)
    for ax, tol in ((ax_g, GRAD_TOL), (ax_p, PARAM_TOL)):
        ax.set_yscale("log")
        ax.axhline(tol, color="#cc0000", lw=0.8, ls="--", label="tolerance (asserted)")
        ax.set_xlabel("epoch")
        ax.set_ylim(1e-18, 1e-3)
        ax.legend(fontsize=8.5, frameon=False, loc="center right")
    ax_g.set_ylabel("‖g$_{J\\text{-}SAM}$ − ∇L$_{reg}$‖ / ‖∇L$_{reg}$‖")
    ax_g.set_title("every step: J-SAM's gradient vs the explicit objective's,\n"
                   "at the J-SAM run's weights", fontsize=10)
    ax_p.set_ylabel("‖w$_{J\\text{-}SAM}$ − w$_{reg}$‖ / ‖w$_{J\\text{-}SAM}$‖")
    ax_p.set_title("two runs from the same init and batches:\n"
                   "J-SAM vs SGD on the explicit objective", fontsize=10)
    fig.suptitle("J-SAM = SGD on the explicit objective of SPEC 2.5: "
                 "ℓ + sg[coefficient]·½(‖x‖²‖Vᵀδ‖² + ‖δ‖²‖Wx‖²), float64 "
                 "(values of 0 drawn at 1e-18)", fontsize=10.5)
    return fig


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Two-layer linear networks under 30% label noise: check that J-SAM equals "
                    "SGD on the explicit activation / last-layer penalty of SPEC 2.5 along whole "
                    "training runs, and plot the activation and last-layer weight norms of SGD, "
                    "1-SAM, J-SAM and the explicit penalty (finding 3).")
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke-test size: {QUICK_EPOCHS} epochs per problem")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the label noise, the initialization and the batch order")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per problem (default "
                        f"{'/'.join(str(c['epochs']) for c in PROBLEMS.values())}, "
                        f"{QUICK_EPOCHS} with --quick)")
    p.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS),
                   help="which problems to run (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the analysis; return the key numbers (also written to the summary JSON)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    problems = {k: PROBLEMS[k] for k in args.problems}
    epochs = {k: args.epochs or (QUICK_EPOCHS if args.quick else c["epochs"])
              for k, c in problems.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    sizes = {k: len(load_dataset(k, noise=NOISE, seed=args.seed).train) for k in problems}
    total = sum(len(METHODS) * epochs[k] * -(-sizes[k] // c["batch"])
                for k, c in problems.items())
    results = {}
    with tqdm(total=total, desc="deep linear", unit="step", disable=args.no_progress) as bar:
        for name, cfg in problems.items():
            bar.set_postfix(problem=name)
            results[name] = train_problem(name, cfg, args.seed, epochs[name], bar)

    df = pd.DataFrame([r for res in results.values() for r in res["rows"]])
    grads = pd.DataFrame([g for res in results.values() for g in res["grad_diffs"]])
    params = pd.DataFrame([
        {"problem": name, "epoch": e, "rel_diff": float(v)}
        for name, res in results.items() for e, v in enumerate(res["param_diff"])])

    summary = {"config": {"noise": NOISE, "seed": args.seed, "dtype": "float64",
                          "optimizer": "mini-batch SGD (no momentum); 1-SAM / J-SAM with m=1",
                          "problems": {k: {**c, "epochs": epochs[k]} for k, c in problems.items()}},
               "grad_tolerance": GRAD_TOL, "param_tolerance": PARAM_TOL, "problems": {}}
    for name in problems:
        d = df[df["problem"] == name]
        final = d[d["epoch"] == epochs[name]].set_index("method")
        g = grads[grads["problem"] == name]["rel_diff"]
        p = params[params["problem"] == name]["rel_diff"]
        summary["problems"][name] = {
            "jsam_vs_explicit_grad_max_rel_diff": float(g.max()),
            "jsam_vs_explicit_grad_steps_checked": int(len(g)),
            "penalty_grad_over_loss_grad_median": float(
                grads[grads["problem"] == name]["penalty_share"].median()),
            "jsam_vs_explicit_final_param_rel_diff": float(p.iloc[-1]),
            "jsam_vs_explicit_max_param_rel_diff": float(p.max()),
            "final": {m: {"activation_norm": float(final.loc[m, "activation_norm"]),
                          "last_layer_weight_norm": float(final.loc[m, "last_layer_weight_norm"]),
                          "test_accuracy": float(final.loc[m, "test_accuracy"]),
                          "peak_test_accuracy": float(d[d["method"] == m]["test_accuracy"].max()),
                          "noisy_train_accuracy": float(final.loc[m, "noisy_train_accuracy"])}
                      for m in METHODS},
            "sam_and_jsam_keep_norms_below_sgd_at_end": bool(
                all(final.loc[m, v] < final.loc["sgd", v]
                    for m in ("sam", "jsam")
                    for v in ("activation_norm", "last_layer_weight_norm"))),
        }

    paths = save_figure(figure_norms(df, problems), out, "deep_linear_norms")
    paths += save_figure(figure_equivalence(grads, params, problems), out,
                         "deep_linear_equivalence")
    summary["figures"] = [str(p) for p in paths]
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    df.to_csv(out / "deep_linear_curves.csv", index=False)
    grads.to_csv(out / "deep_linear_grad_check.csv", index=False)
    (out / "deep_linear_summary.json").write_text(json.dumps(summary, indent=2))

    print(f"\ntwo-layer linear networks, seed {args.seed} ({summary['seconds']} s)")
    for name, s in summary["problems"].items():
        print(f"{name} (ρ = {problems[name]['rho']:g}, {epochs[name]} epochs): "
              f"J-SAM vs explicit objective: max rel. gradient difference "
              f"{s['jsam_vs_explicit_grad_max_rel_diff']:.2e} over "
              f"{s['jsam_vs_explicit_grad_steps_checked']} steps (the penalty's gradient is "
              f"{s['penalty_grad_over_loss_grad_median']:.0%} of the loss gradient, median); "
              f"final rel. parameter difference {s['jsam_vs_explicit_final_param_rel_diff']:.2e}")
        print(f"  {'method':<36}{'mean ‖Wx‖':>10}{'‖V‖_F':>8}{'test acc':>10}{'peak':>8}"
              f"{'noisy fit':>11}")
        for m, v in s["final"].items():
            print(f"  {LABELS[m]:<36}{v['activation_norm']:>10.3f}"
                  f"{v['last_layer_weight_norm']:>8.3f}{100 * v['test_accuracy']:>9.1f}%"
                  f"{100 * v['peak_test_accuracy']:>7.1f}%"
                  f"{100 * v['noisy_train_accuracy']:>10.1f}%")
        print(f"  1-SAM and J-SAM end with smaller ‖Wx‖ and ‖V‖ than SGD: "
              f"{s['sam_and_jsam_keep_norms_below_sgd_at_end']}")
    print(f"figures and numbers in {out}")

    for name, s in summary["problems"].items():
        assert s["jsam_vs_explicit_grad_max_rel_diff"] < GRAD_TOL, (
            f"{name}: J-SAM's gradient differs from the explicit objective's by "
            f"{s['jsam_vs_explicit_grad_max_rel_diff']:.3e}")
        assert s["jsam_vs_explicit_max_param_rel_diff"] < PARAM_TOL, (
            f"{name}: J-SAM and explicit-objective trajectories differ by "
            f"{s['jsam_vs_explicit_max_param_rel_diff']:.3e}")
    return summary


if __name__ == "__main__":
    main()

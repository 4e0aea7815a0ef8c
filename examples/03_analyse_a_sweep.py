"""Example 3: analyse a sweep of stored runs.

A small sweep — SGD and 1-SAM at two radii, two seeds each — written to one folder by
``sam_diagnostics.train`` (what ``sam-diagnostics sweep`` runs), then analysed from the stored
runs only: a summary table per run and per configuration (mean ± sd over seeds), the runs
merged along ``run``, each run taken at its early-stopping peak, and the figures.

    python examples/03_analyse_a_sweep.py --out figures/
"""

import argparse
import tempfile
from pathlib import Path

import torch

import sam_diagnostics as sd
from sam_diagnostics.summary import group_summary, summary_table

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="example-figures", help="folder for the figures")
parser.add_argument("--epochs", type=int, default=15)
args = parser.parse_args()
torch.set_num_threads(1)

# --- the sweep: one zarr store per run in one folder ---------------------------------------
folder = Path(tempfile.mkdtemp()) / "sweep"
grid = [("sgd", 0.05), ("sam", 0.02), ("sam", 0.08)]
for optimizer, rho in grid:
    for seed in (0, 1):
        config = sd.TrainConfig(dataset="digits", model="mlp", width=128, optimizer=optimizer,
                                rho=rho, m=1, lr=0.05, batch_size=64, epochs=args.epochs,
                                seed=seed, noise_rate=0.3, probe_size=128, record_every=1)
        sd.train(config, folder / f"{optimizer}-rho{rho}-seed{seed}.zarr", progress=False)

# --- the analysis, from the stored runs alone ------------------------------------------------
table = summary_table(folder)  # reads only the curves, not per-example data
print(table[["run", "optimizer", "rho", "seed", "best_test_acc", "best_epoch"]]
      .to_string(index=False))
groups = group_summary(table)
print(groups[["optimizer", "rho", "n_seeds", "best_test_acc_mean", "best_test_acc_std"]]
      .round(3).to_string(index=False))

ds = sd.merge_runs(folder)  # dims run, step, example, view, layer
peak = ds.sd.at_peak()      # every run at its own best test accuracy
ratio = peak.sd.ratio("logit_scale")  # SAM/SGD-view logit scale, clean vs noisy, per run
frame = ratio.to_pandas().T.assign(optimizer=ds["optimizer"].values, rho=ds["rho"].values)
print("logit-scale ratio SAM/SGD view at each run's peak (mean over seeds):")
print(frame.groupby(["optimizer", "rho"])[["clean", "noisy"]].mean().round(3))
paths = ds.sd.plot("accuracy", out_dir=args.out)
early = int(ds["step"].values[3])  # epoch 3: before SGD starts to memorize
paths += ds.sd.plot("upweighting", step=early, out_dir=args.out)
print("figures:", ", ".join(str(p) for p in paths if p.suffix == ".png"))

"""Example 2: compare 1-SAM and SGD on your own model.

Your model is any ``nn.Module`` whose last layer is an ``nn.Linear`` (here a small residual
MLP with LayerNorm). Both runs start from the same weights and see the same minibatches;
switching from SGD to 1-SAM is one line. The merged runs answer the paper's two questions:
does SAM up-weight the logit scale of clean examples more than that of noisy ones, and does
its Jacobian term shrink the network's norms?

    python examples/02_compare_sam_sgd.py --out figures/
"""

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from torch import nn

import sam_diagnostics as sd
from sam_diagnostics.data import load_dataset

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="example-figures", help="folder for the figures")
parser.add_argument("--epochs", type=int, default=15)
args = parser.parse_args()
torch.set_num_threads(1)


class ResidualMLP(nn.Module):
    """Your model: anything ending in an nn.Linear."""

    def __init__(self, d_in=64, width=96, classes=10):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.block = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.head(h + self.block(h))


splits = load_dataset("digits", noise=0.3, seed=0)
torch.manual_seed(0)
initial = ResidualMLP()
folder = Path(tempfile.mkdtemp())


def run(optimizer: str) -> Path:
    model = copy.deepcopy(initial)
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = sd.SAM(model, base, rho=0.1, m=1) if optimizer == "sam" else base  # the one line
    gen = torch.Generator().manual_seed(0)  # same minibatches for both runs
    loader = torch.utils.data.DataLoader(splits.train, batch_size=64, shuffle=True,
                                         generator=gen)
    store = folder / f"{optimizer}.zarr"
    config = {"optimizer": optimizer, "rho": 0.1, "m": 1, "lr": 0.05, "seed": 0,
              "noise_rate": 0.3, "dataset": "digits", "model": "residual-mlp"}
    with sd.Recorder(model, store, probe=200, train=splits.train, test=splits.test,
                     config=config, steps_per_epoch=len(loader)) as rec:
        for _ in range(args.epochs):
            for x, y, _ in loader:
                if optimizer == "sam":
                    loss = opt.step(x, y)  # forward, ε_i per example, backward, step, restore
                else:
                    loss = nn.functional.cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                rec.step(loss)
    return store


ds = sd.merge_runs([run("sgd"), run("sam")])
print(ds.sd.summary()[["optimizer", "best_test_acc", "best_epoch", "final_test_acc",
                       "noisy_train_acc_at_best"]].to_string(index=False))
# finding 1: SAM's perturbation up-weights clean examples more than noisy ones
early = ds.sd.ratio("logit_scale").sel(step=ds["step"].values[3])
print("logit-scale ratio SAM/SGD view at epoch 3:")
print(early.to_pandas().rename(columns=dict(enumerate(ds["optimizer"].values))).round(3))
# finding 2: the Jacobian-norm ratio and the last-layer weight norm at the end
last = ds.isel(step=-1)
print("last-layer weight norm at the end:",
      {str(o): round(float(v), 2) for o, v in zip(ds["optimizer"].values,
                                                  last["last_layer_weight_norm"].values)})
paths = []
for kind in ("accuracy", "logit_scale", "norms"):
    paths += ds.sd.plot(kind, out_dir=args.out)
print("figures:", ", ".join(str(p) for p in paths if p.suffix == ".png"))

"""Example 1: instrument your own training loop (three added lines).

A plain PyTorch loop on the 8x8 digits with 30 % symmetric label noise. The Recorder measures
a fixed probe set of training examples (clean and noisy) at ``w`` and at ``w + ε_i`` every
epoch, plus the training curves, and streams them to a zarr store. Afterwards the ``ds.sd``
accessor gives the summary and the figures.

    python examples/01_instrument_your_loop.py --out figures/
"""

import argparse
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
torch.manual_seed(0)
torch.set_num_threads(1)

# --- your data, model and optimizer --------------------------------------------------------
splits = load_dataset("digits", noise=0.3, seed=0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                      nn.Linear(128, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
loader = torch.utils.data.DataLoader(splits.train, batch_size=64, shuffle=True)

# --- the loop, with three added lines -----------------------------------------------------
store = Path(tempfile.mkdtemp()) / "run.zarr"
rec = sd.Recorder(model, store, probe=200, train=splits.train, test=splits.test,  # added
                  steps_per_epoch=len(loader), config={"optimizer": "sgd", "lr": 0.05})
for _ in range(args.epochs):
    for x, y, _ in loader:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.step(loss)                                                                # added
rec.close()                                                                           # added

# --- read it back ---------------------------------------------------------------------------
ds = sd.open_run(store)
print(ds.sd.summary()[["optimizer", "best_test_acc", "best_epoch", "final_test_acc",
                       "noisy_train_acc_at_best"]].to_string(index=False))
ratio = ds.sd.ratio("logit_scale")  # SAM-view / SGD-view mean logit scale, clean vs noisy
print(ratio.isel(step=[1, -1]).to_pandas().round(3))
paths = ds.sd.plot("accuracy", out_dir=args.out) + ds.sd.plot("logit_scale", out_dir=args.out)
print("figures:", ", ".join(str(p) for p in paths if p.suffix == ".png"))

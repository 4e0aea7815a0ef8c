"""Cost of one adaptive-regularizer ("adareg") step relative to one SGD step.

Interleaves the methods step by step (so load from other processes hits all alike), one torch
thread, and reports medians and ratios to SGD::

    python analyses/adareg_cost.py [--steps 200] [--json study-out/full/adareg_cost.json]

The label-noise report quotes the JSON file when it lies in the study folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sam_diagnostics.models import build_model
from sam_diagnostics.optim import make_optimizer

METHODS = ("sgd", "regsgd", "adareg", "sam")


def measure(model_name: str, steps: int, batch: int = 128, methods=METHODS,
            width: int = 256) -> dict[str, float]:
    """Median seconds per step of each method on MNIST-1D-shaped inputs (40 features)."""
    torch.manual_seed(0)
    x = torch.randn(batch, 40)
    y = torch.randint(0, 10, (batch,))
    opts = {}
    for name in methods:
        model = build_model(model_name, (40,), 10, width=width, seed=0)
        opts[name] = make_optimizer(name, model, lr=1e-3, rho=0.05, m=1)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for i in range(steps + 5):
        for name, opt in opts.items():
            t = time.perf_counter()
            opt.step(x, y)
            if i >= 5:  # warm-up
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--json", default=None, help="also write the ratios to this file")
    parser.add_argument("--widths", type=int, nargs="+", default=[256],
                        help="MLP hidden widths (default 256, the study's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = {}
    print(f"torch threads: {torch.get_num_threads()}, batch 128, median of {args.steps} steps")
    for model in args.models:
        for width in (args.widths if model == "mlp" else [256]):
            med = measure(model, args.steps, width=width)
            name = f"{model}-{width}" if model == "mlp" else model
            out[name] = {k: v / med["sgd"] for k, v in med.items()}
            cells = ", ".join(f"{k} {1e3 * v:.2f} ms ({v / med['sgd']:.2f}x)"
                              for k, v in med.items())
            print(f"{name}: {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "batch": 128, "threads": 1, "ratio_to_sgd": out}, f,
                      indent=1)
    return out


if __name__ == "__main__":
    main()

"""Tiny instrumented training runs shared by the accessor, live-scalar and example tests."""

from __future__ import annotations

import torch

from sam_diagnostics.data import load_dataset
from sam_diagnostics.models import build_model
from sam_diagnostics.optim import SAM
from sam_diagnostics.record import Recorder


def tiny_splits():
    return load_dataset("digits", noise=0.3, seed=0, n_samples=200, val_fraction=0.1)


def tiny_run(splits, out=None, *, optimizer="sgd", seed=0, epochs=3, probe=24, **kw):
    """SGD or 1-SAM on a width-16 MLP, recorded every epoch; returns the closed Recorder."""
    model = build_model("mlp", splits.input_shape, splits.num_classes, width=16, seed=seed)
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = SAM(model, base, rho=0.05, m=1) if optimizer == "sam" else base
    gen = torch.Generator().manual_seed(seed)
    n = len(splits.train)
    steps_per_epoch = (n + 63) // 64
    config = {"optimizer": optimizer, "rho": 0.05, "m": 1, "lr": 0.05, "seed": seed,
              "noise_rate": 0.3, "dataset": "digits", "model": "mlp", "epochs": epochs}
    rec = Recorder(model, out, probe=probe, train=splits.train, test=splits.test,
                   config=config, steps_per_epoch=steps_per_epoch, probe_seed=0, **kw)
    with rec:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(steps_per_epoch):
                idx = perm[i * 64:(i + 1) * 64]
                x, y = splits.train.inputs[idx], splits.train.labels[idx]
                if optimizer == "sam":
                    loss = opt.step(x, y)
                else:
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                rec.step(loss)
    return rec

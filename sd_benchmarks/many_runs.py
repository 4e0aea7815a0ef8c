"""Analysis of many runs: peak memory and time of a summary over a synthetic sweep.

Writes ``N`` synthetic runs (schema-conform stores, random numbers; no training) and, each in
a fresh interpreter, summarizes them three ways: ``open_runs`` (lazy, dask), the paths (what
``sam-diagnostics summary DIR`` does: one run's curves at a time) and ``merge_runs`` (eager:
everything in memory). Prints a Markdown table of time and peak-RSS increase per N; the
numbers in ``docs/scale.md`` come from::

    python -m sd_benchmarks.many_runs --runs 25 50 100 200 --out /tmp/many_runs

Examples
--------
>>> from sd_benchmarks.many_runs import write_runs
>>> paths = write_runs("/tmp/runs", 3, steps=4, examples=8)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import xarray as xr

from sam_diagnostics._version import __version__
from sam_diagnostics.record import describe_dataset
from sam_diagnostics.schema import CURVES, PER_EXAMPLE, RUN_ATTRS

HOW = ("open_runs", "paths", "merge_runs")


def synthetic_run(seed: int, *, steps: int = 21, examples: int = 256,
                  layers: int = 2) -> xr.Dataset:
    """One run's dataset of the stored schema filled with random numbers (seeded)."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(10 * examples, examples, replace=False))
    per_ex = (steps, 2, examples)
    data = {name: (("step", "view", "example"), rng.random(per_ex)) for name in PER_EXAMPLE
            if name != "activation_norm"}
    data["activation_norm"] = (("step", "view", "example", "layer"),
                               rng.random((*per_ex, layers)))
    for name in CURVES:
        if name != "val_accuracy":
            data[name] = ("step", rng.random(steps))
    data["last_layer_weight_norm"] = ("step", rng.random(steps))
    labels = rng.integers(0, 10, examples)
    noisy = rng.random(examples) < 0.3
    ds = xr.Dataset(data, coords={
        "step": np.arange(steps) * 10, "epoch": ("step", np.arange(steps, dtype=float)),
        "view": ["sgd", "sam"], "example": ids, "layer": [f"layer{i}" for i in range(layers)],
        "label": ("example", labels), "true_label": ("example", np.where(noisy, 0, labels)),
        "is_noisy": ("example", noisy)})
    return describe_dataset(ds)


def write_runs(folder: str | Path, n: int, **sizes) -> list[Path]:
    """``n`` synthetic runs ``run-XXXX.zarr`` in ``folder`` (existing ones are kept)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    optimizers = ("sgd", "sam", "lsam", "jsam", "regsgd")
    for i in range(n):
        path = folder / f"run-{i:04d}.zarr"
        paths.append(path)
        if path.exists():
            continue
        attrs = {"optimizer": optimizers[i % 5], "rho": 0.05, "m": 1, "seed": i // 5,
                 "dataset": "mnist1d", "model": "mlp", "noise_rate": 0.3, "lr": 0.05,
                 "epochs": 200}
        ds = synthetic_run(i, **sizes)  # as a finished RunStore leaves it, in one write
        ds.attrs = {**RUN_ATTRS, "sam_diagnostics_version": __version__, **attrs,
                    "complete": 1}
        ds.to_zarr(path, mode="w-", consolidated=True, zarr_format=2,
                   encoding={v: {"chunks": (16, *ds[v].shape[1:])} for v in ds.data_vars})
    return paths


def _child(folder: str, n: int, how: str) -> dict:
    import dask.array  # noqa: F401 - imported before the baseline, as in a user's session

    from sam_diagnostics import merge_runs, open_runs
    from sam_diagnostics.summary import summary_table

    paths = sorted(Path(folder).glob("run-*.zarr"))[:n]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if how == "open_runs":
        table = summary_table(open_runs(paths))
    elif how == "paths":
        table = summary_table(paths)
    else:
        table = summary_table(merge_runs(paths))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"runs": len(table), "seconds": seconds, "delta_mb": peak - base}


def measure(folder: str | Path, n: int, how: str) -> dict:
    """Summarize the first ``n`` runs of ``folder`` one way in a fresh interpreter."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "sd_benchmarks.many_runs", "--child",
                          str(folder), str(n), how], capture_output=True, text=True, env=env,
                         timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, nargs="+", default=[25, 50, 100, 200])
    p.add_argument("--out", default="/tmp/sd_many_runs", help="folder of the synthetic runs")
    p.add_argument("--steps", type=int, default=21)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--how", nargs="+", default=list(HOW), choices=HOW)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        folder, n, how = args.child
        print(json.dumps(_child(folder, int(n), how)))
        return
    start = time.perf_counter()
    write_runs(args.out, max(args.runs), steps=args.steps, examples=args.examples)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file()) / 2**20
    print(f"{max(args.runs)} runs ({args.steps} steps x 2 views x {args.examples} examples) "
          f"written in {time.perf_counter() - start:.0f} s, {size:.0f} MiB on disk\n")
    print("| runs | " + " | ".join(f"{h}: s / peak MiB" for h in args.how) + " |")
    print("|---:|" + "---:|" * len(args.how))
    for n in args.runs:
        cells = []
        for how in args.how:
            r = measure(args.out, n, how)
            cells.append(f"{r['seconds']:.1f} / {r['delta_mb']:.0f}")
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

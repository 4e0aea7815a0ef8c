"""Recording overhead of a default ``sam-diagnostics train`` run (issue 6's target: ≤ 10 %).

    python -m sd_benchmarks.recording_overhead [--epochs 200] [--reps 2]

Trains the default configuration (MNIST-1D, MLP, SGD) with the default schedule (a record every
10 epochs) and with records only at the start and the end (``record_every=0``), interleaved,
single-threaded, and prints the best wall time of each and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from sam_diagnostics import TrainConfig, train
from sam_diagnostics.data import load_dataset


def main(argv=None) -> dict[int, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--reps", type=int, default=2, help="interleaved pairs of runs")
    parser.add_argument("--schedules", type=int, nargs="+", default=[10],
                        help="record_every values to compare with 0 (default: the default, 10)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_dataset(TrainConfig.dataset)  # built once (cached), outside the timing
    times: dict[int, list[float]] = {}
    for _ in range(args.reps):
        for every in [0, *args.schedules, 0, *args.schedules]:
            start = time.perf_counter()
            train(TrainConfig(record_every=every, epochs=args.epochs), progress=False)
            times.setdefault(every, []).append(time.perf_counter() - start)
    base = min(times[0])
    print(f"torch {torch.__version__}, 1 thread, {args.epochs} epochs, best of "
          f"{2 * args.reps} runs each")
    for every, t in sorted(times.items()):
        print(f"record_every={every:3d}: {min(t):7.2f} s   overhead {min(t) / base - 1:+.1%}")
    return {k: min(v) for k, v in times.items()}


if __name__ == "__main__":
    main()

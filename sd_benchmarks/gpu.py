"""The benchmark table on a CUDA GPU: ``python -m sd_benchmarks.gpu --out gpu-bench.md``.

Every method is timed round-robin with its baseline in the same process (CUDA-synchronized,
median of ``--reps`` after a warm-up); the table gives milliseconds, the ratio of medians and
the peak GPU memory each method allocates beyond the model and data.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sam_diagnostics as sd

from .models import CONFIGS


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _peak(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cases(name: str, dtype=None):
    cfg = CONFIGS[name]
    model = cfg.model().cuda().eval()
    x, y = cfg.data()
    x, y = x.cuda(), y.cuda()
    base = torch.optim.SGD(model.parameters(), lr=0.0)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    def sgd():
        fwd_bwd()
        base.step()

    sam = {v: sd.SAM(model, base, 0.05, 1, v) for v in ("sam", "lsam", "jsam")}
    return [
        ("jacobian norm", fwd_bwd, lambda: sd.jacobian_norms(model, x)),
        ("gradient norm", fwd_bwd, lambda: sd.grad_norms(model, x, y)),
        ("1-SAM step", sgd, lambda: sam["sam"].step(x, y)),
        ("L-SAM step", sgd, lambda: sam["lsam"].step(x, y)),
        ("J-SAM step", sgd, lambda: sam["jsam"].step(x, y)),
    ]


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    rows = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", "",
            "| model (batch) | method | baseline ms | ms | ratio | peak MiB (method / baseline) |",
            "|---|---|---|---|---|---|"]
    for name in CONFIGS:
        for label, baseline, fn in cases(name):
            fn(), baseline()  # warm-up (and the engine's one-time self-check)
            tb, tm = [], []
            for _ in range(args.reps):
                tb += _time(baseline, 1)
                tm += _time(fn, 1)
            mb, mm = statistics.median(tb), statistics.median(tm)
            rows.append(f"| {name} ({CONFIGS[name].batch}) | {label} | {mb:.2f} | {mm:.2f} | "
                        f"{mm / mb:.2f}× | {_peak(fn):.0f} / {_peak(baseline):.0f} |")
            print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()

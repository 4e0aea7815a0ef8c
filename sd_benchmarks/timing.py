"""Interleaved median timing and peak-RSS measurement in child processes.

On a shared machine the load changes while a benchmark runs; timing the methods of one group
round-robin (each repetition calls every method once, in a rotated order) exposes them all to
the same conditions, and medians ignore the occasional stall.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Case", "interleaved", "peak_rss_mb", "reset_peak_rss", "child_peak_rss"]


@dataclass
class Case:
    """One timed method.

    ``make()`` does the setup (model copies, optimizers, wrappers) and returns the zero-argument
    callable that is timed. ``scale`` multiplies the measured time (linear extrapolation from a
    sub-batch: ``scale = B / sub_batch``); ``note`` says so. ``targets`` are checked by
    :func:`sd_benchmarks.run.check_targets`: ``("ratio", x)`` = ratio to the group's baseline
    ``<= x``,
    ``("faster", name)`` = median below that case's.
    """

    name: str
    make: Callable[[], Callable[[], object]]
    scale: float = 1.0
    note: str = ""
    targets: list = field(default_factory=list)
    baseline: bool = False
    error: str | None = None  # set when setup or the first call failed (e.g. not installed)


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of every function, ``reps`` rounds after ``warmup`` rounds, round-robin.

    The order is rotated by one each round so no method always runs right after another.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
        if log is not None and r == warmup - 1:
            log("warm-up done: " + ", ".join(
                f"{n} {1e3 * t:.1f} ms" for n, t in ((n, _last(fns, n, times)) for n in names)
                if t is not None))
    return times


def _last(fns, name, times):
    return times[name][-1] if times[name] else None


def median_ms(times: list[float], scale: float = 1.0) -> float:
    return 1e3 * scale * statistics.median(times)


def _status_mb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> float:
    """Reset the peak-RSS mark to the current RSS where Linux allows it; returns the value
    that :func:`peak_rss_mb` should be compared with afterwards (MiB)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return _status_mb("VmRSS") or peak_rss_mb()
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status`` (``ru_maxrss`` would include the peak of the
    parent that forked this interpreter); elsewhere ``ru_maxrss``.
    """
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def child_peak_rss(section: str, model: str, method: str, threads: int, quick: bool,
                   timeout: float = 600) -> tuple[float | None, str]:
    """Run one method once in a fresh interpreter; its peak-RSS increase over the RSS after
    setup (model, data, wrappers built), in MiB, or ``(None, reason)``."""
    cmd = [sys.executable, "-m", "sd_benchmarks.run", "--child", section, model, method,
           "--threads", str(threads)] + (["--quick"] if quick else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root)
    except subprocess.TimeoutExpired:
        return None, "timed out"
    for line in reversed(res.stdout.splitlines()):
        if line.startswith("{"):
            out = json.loads(line)
            return out.get("delta_mb"), out.get("error", "")
    return None, (res.stderr.strip().splitlines() or ["failed"])[-1][:120]

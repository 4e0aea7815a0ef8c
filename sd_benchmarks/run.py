"""Run the benchmarks and print (or write) markdown tables.

    python -m sd_benchmarks.run                    # everything, ~10 min on a 2-core machine
    python -m sd_benchmarks.run --quick            # tiny sizes, seconds (a smoke run)
    python -m sd_benchmarks.run --only mlp steps   # sections and/or models
    python -m sd_benchmarks.run --memory --out docs/benchmarks.md

Every group (one model × one section) is timed round-robin with its baseline — one plain
forward + backward (norms, probe) or one plain SGD step (steps) — in the same process; the
tables give median milliseconds over ``--reps`` repetitions after a warm-up and the ratio of
medians. ``--memory`` also runs each method once in a fresh interpreter and reports the
increase of its peak resident set size over the peak after setup (torch allocations are not
visible to ``tracemalloc``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import warnings
from importlib import metadata

import torch

from .bench_norms import grad_cases, jacobian_cases
from .bench_steps import probe_cases, step_cases
from .models import CONFIGS
from .timing import Case, child_peak_rss, interleaved, median_ms, peak_rss_mb, reset_peak_rss

SECTIONS = {
    "jacobian": ("1. Per-example Jacobian norm (C = 10)", "fwd+bwd"),
    "grad": ("2. Per-example gradient norm", "fwd+bwd"),
    "steps": ("3. Optimizer steps", "SGD step"),
    "probe": ("4. Probe.measure on a 1,024-example probe set", "fwd+bwd over the probe set"),
}
SECTION_MODELS = {"probe": ("mlp", "cnn")}
QUICK_BATCH = 8


def build_cases(section: str, model_name: str, quick: bool) -> list[Case]:
    """The cases of one group, with a fresh model and data (setup is deferred to ``make``)."""
    cfg = CONFIGS[model_name]
    model = cfg.model()
    model.eval()  # no dropout/BatchNorm in these models; the library measures in eval mode too
    if section == "probe":
        return probe_cases(cfg, model, quick)
    x, y = cfg.data(QUICK_BATCH if quick else None)
    fn = {"jacobian": jacobian_cases, "grad": grad_cases, "steps": step_cases}[section]
    return fn(cfg, model, x, y, quick)


def _short_error(err: BaseException) -> str:
    if isinstance(err, ImportError):
        return "not installed (pip install -e .[bench])"
    if isinstance(err, NotImplementedError):
        return str(err)
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"failed: {type(err).__name__}: {msg[:140]}"


def run_group(section: str, model_name: str, args, log) -> dict:
    cases = build_cases(section, model_name, args.quick)
    fns = {}
    for case in cases:
        try:
            fn = case.make()
            fn()  # first call: one-time setup costs, and unsupported layers fail here
            fns[case.name] = fn
        except Exception as err:  # noqa: BLE001 - reported in the table
            case.error = _short_error(err)
            log(f"  {case.name}: {case.error}")
    t0 = time.perf_counter()
    times = interleaved(fns, reps=args.reps, warmup=args.warmup)
    log(f"  timed {len(fns)} methods × {args.reps} reps in {time.perf_counter() - t0:.1f} s")
    base = next(c for c in cases if c.baseline)
    rows = []
    base_ms = median_ms(times[base.name], base.scale) if base.name in times else float("nan")
    for case in cases:
        row = {"section": section, "model": model_name, "method": case.name,
               "note": case.note, "error": case.error, "targets": case.targets,
               "baseline": case.baseline, "ms": None, "ratio": None, "mem": None,
               "mem_note": ""}
        if case.name in times:
            row["ms"] = median_ms(times[case.name], case.scale)
            row["ratio"] = row["ms"] / base_ms
        if args.memory and case.error is None:
            row["mem"], row["mem_note"] = child_peak_rss(section, model_name, case.name,
                                                         args.threads, args.quick)
        rows.append(row)
    check_targets(rows)
    return {"section": section, "model": model_name, "rows": rows,
            "batch": _batch_of(section, model_name, args.quick)}


def _batch_of(section, model_name, quick):
    if section == "probe":
        return 16 if quick else 1024
    return QUICK_BATCH if quick else CONFIGS[model_name].batch


def check_targets(rows: list[dict]) -> None:
    """Fill ``target`` (text) and ``met`` ("yes" / "no" / "n/a") of every row with targets."""
    by_name = {r["method"]: r for r in rows}
    for r in rows:
        texts, met = [], []
        for t in r["targets"]:
            if t[0] == "ratio":
                texts.append(f"≤ {t[1]:g}×")
                met.append(None if r["ratio"] is None else r["ratio"] <= t[1])
            elif t[0] == "faster":
                other = by_name.get(t[1], {})
                texts.append(f"faster than {t[1]}")
                ok = r["ms"] is not None and other.get("ms") is not None
                met.append(r["ms"] < other["ms"] if ok else None)
            elif t[0] == "speedup":
                other = by_name.get(t[1], {})
                texts.append(f"≥ {t[2]:g}× faster than {t[1]}")
                ok = r["ms"] is not None and other.get("ms") is not None
                met.append(other["ms"] / r["ms"] >= t[2] if ok else None)
        r["target"] = "; ".join(texts)
        r["met_each"] = met
        if not met:
            r["met"] = ""
        else:
            r["met"] = " / ".join("n/a" if m is None else ("yes" if m else "**no**")
                                  for m in met)


def _fmt_ms(ms):
    if ms is None:
        return "—"
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def _fmt_ratio(r):
    if r is None:
        return "—"
    return f"{r:,.0f}×" if r >= 100 else f"{r:.2f}×"


def _fmt_mem(row):
    if row["mem"] is None:
        return row["mem_note"] or "—"
    return f"{row['mem']:,.0f}"


def markdown(results: list[dict], args) -> str:
    lines = []
    for section, (title, base) in SECTIONS.items():
        groups = [g for g in results if g["section"] == section]
        if not groups:
            continue
        lines += [f"### {title}", "",
                  f"Ratios are to the median {base} of the same model in the same run.", "",
                  "| model (batch) | method | median ms | × " + base.split(" over")[0]
                  + " | peak RSS Δ MB | target | met? | notes |",
                  "|---|---|--:|--:|--:|---|---|---|"]
        for g in groups:
            label = f"{g['model']} ({g['batch']})"
            for r in g["rows"]:
                note = r["error"] or r["note"]
                lines.append(f"| {label} | {r['method']} | {_fmt_ms(r['ms'])} | "
                             f"{_fmt_ratio(r['ratio'])} | {_fmt_mem(r)} | {r['target']} | "
                             f"{r['met']} | {note} |")
        lines.append("")
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    lines = ["### Targets", "", "| section | model | method | target | measured | met? |",
             "|---|---|---|---|---|---|"]
    for g in results:
        by_name = {r["method"]: r for r in g["rows"]}
        for r in g["rows"]:
            for t, m in zip(r["targets"], r["met_each"]):
                if t[0] == "ratio":
                    text, meas = f"≤ {t[1]:g}× baseline", _fmt_ratio(r["ratio"])
                else:
                    other = by_name.get(t[1], {})
                    text = (f"faster than {t[1]}" if t[0] == "faster"
                            else f"≥ {t[2]:g}× faster than {t[1]}")
                    meas = (f"{_fmt_ms(r['ms'])} vs {_fmt_ms(other.get('ms'))} ms"
                            if r["ms"] and other.get("ms") else "—")
                    if t[0] == "speedup" and r["ms"] and other.get("ms"):
                        meas += f" ({other['ms'] / r['ms']:,.0f}×)"
                met = "n/a" if m is None else ("yes" if m else "**no**")
                lines.append(f"| {g['section']} | {g['model']} | {r['method']} | {text} | "
                             f"{meas} | {met} |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def header(args, load_before, loads, seconds) -> str:
    cmd = "python -m sd_benchmarks.run " + " ".join(args.argv)
    return "\n".join([
        "## Benchmarks", "",
        f"Generated by `{cmd.strip()}` on {datetime.date.today().isoformat()}.", "",
        f"- machine: {platform.machine()}, {_cpu_name()}, {os.cpu_count()} logical CPUs, "
        f"{platform.system()} {platform.release()}",
        f"- torch {torch.__version__}, {torch.get_num_threads()} thread(s) "
        f"(`torch.set_num_threads`), Python {platform.python_version()}; "
        f"opacus {_version('opacus')}, backpack-for-pytorch {_version('backpack-for-pytorch')}",
        f"- median of {args.reps} repetitions after {args.warmup} warm-up round(s) (plus one "
        "first call), methods of a group interleaved round-robin; `×` columns are ratios of "
        "medians measured in the same process",
        f"- load average (1 min; this run alone is ≈ 1): before {load_before:.2f}, after each "
        f"group max {max(loads, default=0):.2f}; total wall time {seconds / 60:.1f} min",
        "- peak RSS Δ: each method's first call in a fresh interpreter, its peak resident set "
        "size (`VmHWM`, reset after setup) minus the RSS after setup (model, data, wrappers "
        "built); includes one-time allocations; '—' = not measured (run with `--memory`)",
        "- '×N' in notes: timed on a sub-batch and extrapolated linearly to the full batch",
    ] + (["- **quick run**: tiny batches, for checking that the benchmark runs; the targets "
          "are meant for the full sizes"] if args.quick else []) + [""])


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m sd_benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"tiny sizes (batch {QUICK_BATCH}), 3 repetitions: a smoke run")
    p.add_argument("--only", nargs="+", default=[], metavar="NAME",
                   help=f"sections {list(SECTIONS)} and/or models {list(CONFIGS)}")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds (default 1)")
    p.add_argument("--memory", action="store_true",
                   help="also measure peak RSS per method in child processes")
    p.add_argument("--out", default=None, help="write the markdown tables to this file")
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS,
                   metavar=("SECTION", "MODEL", "METHOD"))
    args = p.parse_args(argv)
    args.argv = [a for a in argv if a]
    if args.reps is None:
        args.reps = 3 if args.quick else 10
    unknown = set(args.only) - set(SECTIONS) - set(CONFIGS)
    if unknown:
        p.error(f"--only: unknown names {sorted(unknown)}; choose from "
                f"{list(SECTIONS) + list(CONFIGS)}")
    return args


def child(args) -> None:
    """``--child SECTION MODEL METHOD``: set up, then one call; print the peak-RSS increase."""
    section, model_name, method = args.child
    try:
        case = next(c for c in build_cases(section, model_name, args.quick)
                    if c.name == method)
        fn = case.make()
        before = reset_peak_rss()
        fn()
        out = {"delta_mb": peak_rss_mb() - before}
    except Exception as err:  # noqa: BLE001
        out = {"delta_mb": None, "error": _short_error(err)}
    print(json.dumps(out))


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    torch.set_num_threads(args.threads)
    # BackPACK/Opacus warn about unsupported modules and full backward hooks on every call
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.child:
        child(args)
        return []
    sections = [s for s in SECTIONS if s in args.only] or list(SECTIONS)
    models = [m for m in CONFIGS if m in args.only] or list(CONFIGS)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    log(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{'quick' if args.quick else 'full'} run, {args.reps} reps")
    load_before, t0, loads = os.getloadavg()[0], time.perf_counter(), []
    results = []
    for section in sections:
        for model_name in models:
            if model_name not in SECTION_MODELS.get(section, CONFIGS):
                continue
            log(f"[{section} / {model_name}]")
            results.append(run_group(section, model_name, args, log))
            loads.append(os.getloadavg()[0])
    text = (header(args, load_before, loads, time.perf_counter() - t0) + "\n"
            + markdown(results, args) + "\n" + summary(results))
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return results


if __name__ == "__main__":
    main()

"""The ``sam-diagnostics`` command line: train, sweep, summary, plot, validate.

This module holds the parser and the dispatch; the work is in :mod:`~sam_diagnostics.train`,
:mod:`~sam_diagnostics.sweep`, :mod:`~sam_diagnostics.summary` and :mod:`~sam_diagnostics.runs`.

Examples
--------
::

    sam-diagnostics train --dataset digits --optimizer sam --group-size 1 --noise 0.3 --epochs 3 \\
        --out run.zarr
    sam-diagnostics summary run.zarr
    sam-diagnostics plot run.zarr --out figs
    sam-diagnostics sweep --dataset mnist1d --optimizers sgd sam jsam --seeds 0-4 \\
        --rho 0.03 0.05 --epochs 100 --out runs/ --jobs 2
    sam-diagnostics summary runs/
    sam-diagnostics validate run.zarr
    torchrun --nproc_per_node 2 -m sam_diagnostics train --optimizer sam --group-size 1 \\
        --out run.zarr

A bad configuration (unknown name, a value out of range, missing data, an existing output
without ``--overwrite``, an output another process is writing, a path that cannot be written,
a path that is not a run) prints one line on stderr and exits with status 2, before any
training. ``validate`` exits with 1 when a store breaks the schema.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .data import NOISE_MODES, dataset_names
from .models import MODELS
from .runs import EmptyRunError, NotARunError
from .schema import OPTIMIZER_NAMES
from .train import AMP_MODES, ConfigError, TrainConfig

__all__ = ["main", "build_parser"]

_DEFAULTS = TrainConfig()


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (no usage block) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _Fail(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _ranged_ints(values: Sequence[str]) -> list[int]:
    """``["0-2", "5"]`` or ``["0,1", "7"]`` -> ``[0, 1, 2, 5]``."""
    out: list[int] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            try:
                if sep and lo:
                    out.extend(range(int(lo), int(hi) + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise _Fail(f"bad seed {part!r}: use integers or ranges like 0-4") from None
    return list(dict.fromkeys(out))


def _split_list(values: Sequence[str], kind=str) -> list:
    out = []
    for value in values:
        for part in str(value).split(","):
            if part.strip():
                try:
                    out.append(kind(part.strip()))
                except ValueError:
                    raise _Fail(f"bad value {part!r}") from None
    return list(dict.fromkeys(out))


def _add_run_options(p: argparse.ArgumentParser, *, sweep: bool) -> None:
    d = _DEFAULTS
    p.add_argument("--dataset", choices=dataset_names(), default=d.dataset,
                   help=f"data set (default {d.dataset})")
    p.add_argument("--model", choices=MODELS, default=d.model, help=f"model (default {d.model})")
    if sweep:
        p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZER_NAMES),
                       metavar="NAME", help="optimizers to run, from "
                       f"{{{','.join(OPTIMIZER_NAMES)}}} (default: all)")
        p.add_argument("--seeds", nargs="+", default=["0"], metavar="S",
                       help="seeds: integers or ranges like 0-4 (default 0)")
        p.add_argument("--rho", nargs="+", type=float, default=[d.rho], metavar="R",
                       help=f"SAM radii (default {d.rho}); sgd and regsgd ignore rho and run "
                       "once, at the first value")
    else:
        p.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default=d.optimizer,
                       help=f"optimizer (default {d.optimizer})")
        p.add_argument("--rho", type=float, default=d.rho,
                       help=f"SAM radius, also the probe's SAM-view radius (default {d.rho})")
        p.add_argument("--seed", type=int, default=d.seed, help="seed of noise, split, probe, "
                       f"init and batch order (default {d.seed})")
    p.add_argument("--group-size", type=int, default=d.m, dest="m", metavar="M",
                   help=f"examples per perturbation group m: 1 = 1-SAM, 0 = whole batch "
                   f"(default {d.m})")
    p.add_argument("--noise", type=float, default=d.noise_rate, dest="noise_rate",
                   help=f"label-noise rate in [0, 1) (default {d.noise_rate})")
    p.add_argument("--noise-mode", choices=NOISE_MODES, default=d.noise_mode,
                   help=f"label-noise model (default {d.noise_mode})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"(default {d.epochs})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr})")
    p.add_argument("--momentum", type=float, default=d.momentum, help=f"(default {d.momentum})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"(default {d.weight_decay})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"(default {d.batch_size})")
    p.add_argument("--gamma-act", type=float, default=d.gamma_act,
                   help=f"regsgd activation penalty (default {d.gamma_act})")
    p.add_argument("--gamma-weight", type=float, default=d.gamma_weight,
                   help=f"regsgd last-layer weight penalty (default {d.gamma_weight})")
    p.add_argument("--width", type=int, default=d.width, help=f"MLP width (default {d.width})")
    p.add_argument("--n-samples", type=int, default=None,
                   help="size of the training pool (default: the whole source)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"validation share of the noisy pool (default {d.val_fraction})")
    p.add_argument("--probe-size", type=int, default=d.probe_size,
                   help=f"probe examples, stratified clean/noisy (default {d.probe_size})")
    p.add_argument("--record-every", type=int, default=d.record_every, metavar="EPOCHS",
                   help=f"record every this many epochs (default {d.record_every})")
    p.add_argument("--record-every-steps", type=int, default=d.record_every_steps,
                   metavar="STEPS", help="also record every this many steps (default: off)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the official binary CIFAR-10 files (cifar10 only)")
    p.add_argument("--device", default=d.device, help=f"torch device (default {d.device}; "
                   "under torchrun 'cuda' is each rank's cuda:LOCAL_RANK)")
    p.add_argument("--amp", choices=AMP_MODES, default=d.amp,
                   help="bf16: autocast the training forward passes to bfloat16; SAM's ε and "
                   f"the update use float32 gradients (default {d.amp})")
    if not sweep:
        p.add_argument("--sync-epsilon", choices=("global", "replica"), default=d.sync_epsilon,
                       help="under torchrun with --group-size 0: the global batch's ε "
                       "(default: the run of one process) or each rank's own")
    p.add_argument("--flush-every", type=int, default=16, metavar="RECORDS",
                   help="recorded steps buffered per zarr append (default 16; 1 = every record)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing runs at the output path(s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sam-diagnostics``."""
    parser = _Parser(
        prog="sam-diagnostics",
        description="Per-example diagnostics of SAM under label noise: train instrumented "
        "runs, sweep optimizers x seeds, summarize, plot and validate them.",
        epilog="Run 'sam-diagnostics COMMAND --help' for the options of a command.",
    )
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = sub.add_parser("train", help="train one model with one optimizer and record the run",
                       description="Train one model and stream its diagnostics to a zarr "
                       "store.")
    _add_run_options(p, sweep=False)
    p.add_argument("--out", required=True, help="the run's zarr store to create (RUN.zarr)")

    p = sub.add_parser("sweep", help="a grid of optimizers x seeds (x rho) into one folder, "
                       "resumable", description="Run a grid of optimizers x seeds (x rho) "
                       "into one folder; finished runs are skipped, unfinished ones redone.")
    _add_run_options(p, sweep=True)
    p.add_argument("--out", required=True, help="the folder of runs")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs in parallel: the worker processes (one thread each) of a local "
                   "dask cluster (default 1: one run after the other in this process)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="submit the runs to the running dask cluster whose scheduler is at "
                   "ADDRESS (e.g. tcp://10.0.0.5:8786; see docs/scale.md) instead")

    p = sub.add_parser("summary", help="table of best/final test accuracy per run and over "
                       "seeds", description="Best test accuracy and its epoch, final test "
                       "accuracy, clean/noisy training accuracy at the best epoch; per run and "
                       "mean ± std over seeds.")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_DIR", help="runs or folders of runs")
    p.add_argument("--csv", default=None, help="also write the per-run table to this CSV file")

    p = sub.add_parser("plot", help="write the standard figures",
                       description="Write the standard figures of one run or of all runs in a "
                       "folder (merged along 'run').")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_DIR", help="runs or folders of runs")
    p.add_argument("--out", required=True, help="folder for the figures")

    p = sub.add_parser("validate", help="check stored runs against the schema",
                       description="Check runs against the stored-data schema (names, dims, "
                       "long_name/units, schema_version); exit 1 if one breaks it.")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_DIR", help="runs or folders of runs")
    return parser


# --------------------------------------------------------------------------------------------
# train / sweep
# --------------------------------------------------------------------------------------------


def _config_from(args: argparse.Namespace, **override) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values.update(override)
    return TrainConfig(**values)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def _check_flush(flush_every: int) -> None:
    if flush_every < 1:
        raise ConfigError(f"--flush-every must be >= 1, got {flush_every}")


def _sigterm_to_exit() -> None:
    """Let SIGTERM unwind normally (flushing the store) instead of killing outright."""
    def handler(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import run_summary_line, train

    cfg = _config_from(args).validate()
    _check_flush(args.flush_every)
    _set_threads(args.threads)
    _sigterm_to_exit()
    start = time.perf_counter()
    out = Path(args.out).expanduser()
    ds = train(cfg, out, progress=not args.no_progress, overwrite=args.overwrite,
               flush_every=args.flush_every)
    if ds is not None:  # under torchrun: rank 0, the store's writer
        print(f"{out}: {run_summary_line(ds, time.perf_counter() - start)}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import pending_runs, plan_sweep, run_sweep

    optimizers = _split_list(args.optimizers)
    unknown = [o for o in optimizers if o not in OPTIMIZER_NAMES]
    if unknown:
        raise _Fail(f"unknown optimizer {unknown[0]!r}; choose from {', '.join(OPTIMIZER_NAMES)}")
    seeds = _ranged_ints(args.seeds)
    rhos = list(dict.fromkeys(args.rho))
    if not optimizers or not seeds or not rhos:
        raise _Fail("the grid is empty: give at least one optimizer, seed and rho")
    if args.jobs < 1:
        raise _Fail(f"--jobs must be >= 1, got {args.jobs}")
    _check_flush(args.flush_every)
    out_dir = Path(args.out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise _Fail(f"--out {str(out_dir)!r} exists and is not a folder")
    plan = plan_sweep(_config_from(args, rho=rhos[0]), out_dir, optimizers, seeds, rhos)
    todo = pending_runs(plan, overwrite=args.overwrite)
    print(f"sweep: {len(plan)} runs, {len(plan) - len(todo)} already done, {len(todo)} to run",
          flush=True)
    if not todo:
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise _Fail(f"cannot write to --out {str(out_dir)!r}: permission denied")
    _set_threads(args.threads)
    local = args.scheduler is None and (args.jobs == 1 or len(todo) == 1)
    if local:
        _sigterm_to_exit()
    failed = run_sweep(todo, jobs=args.jobs, threads=args.threads if local else args.threads or 1,
                       flush_every=args.flush_every, progress=not args.no_progress and local,
                       echo=lambda line: print(line, flush=True), scheduler=args.scheduler)
    if failed:
        print(f"sam-diagnostics sweep: error: {len(failed)} of {len(todo)} runs failed "
              "(see above)", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------------------------
# summary / plot / validate
# --------------------------------------------------------------------------------------------


def _collect(paths: Sequence[str]) -> list[Path]:
    from .runs import find_runs, glob_runs

    runs: list[Path] = []
    for p in paths:
        if not Path(p).expanduser().exists() and any(c in str(p) for c in "*?["):
            runs.extend(glob_runs(p))  # a pattern the shell did not expand (quoted)
        else:
            runs.extend(find_runs(p))
    return list(dict.fromkeys(runs))


def _readable(runs: list[Path]) -> list[Path]:
    """The runs that hold a step (others are named on stderr); refuse non-runs."""
    from .runs import open_run

    kept = []
    for path in runs:
        try:
            open_run(path, load=False, warn=False).close()
        except EmptyRunError as err:
            print(f"skipped: {' '.join(str(err).split())}", file=sys.stderr)
            continue
        kept.append(path)
    if not kept:
        raise _Fail("no run holds a recorded step yet")
    return kept


def _cmd_summary(args: argparse.Namespace) -> int:
    from .summary import format_summary, summary_table

    if args.csv:
        csv = Path(args.csv).expanduser()
        if csv.is_dir() or not csv.parent.is_dir():
            raise _Fail(f"--csv {args.csv!r}: " + ("is a folder" if csv.is_dir()
                                                   else "its folder does not exist"))
    runs = _readable(_collect(args.runs))
    try:
        table = summary_table(runs)
    except ValueError as err:
        raise _Fail(str(err)) from None
    print(format_summary(table))
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"\nwrote {args.csv}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .runs import validate_run

    results = [validate_run(path) for path in _collect(args.runs)]
    for result in results:
        print(result)
    return 0 if all(r.ok for r in results) else 1


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plots import MissingVariableError, plot_standard
    from .runs import open_run, open_runs

    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise _Fail(f"--out {args.out!r} exists and is not a folder")
    runs = _readable(_collect(args.runs))
    try:
        # many runs: lazily (dask), each figure reads only its variables
        ds = open_run(runs[0], warn=False) if len(runs) == 1 else open_runs(runs)
    except ValueError as err:
        raise _Fail(str(err)) from None
    try:
        paths = plot_standard(ds, args.out)
    except MissingVariableError as err:
        raise _Fail(str(err)) from None
    print(f"wrote {len(paths)} files to {args.out}:")
    for p in paths:
        print(f"  {p}")
    return 0


#: Options renamed so that torchrun's parser never takes one of ours for an abbreviation of its
#: own (``--m`` matched ``--max-restarts``, ``--monitor-interval``, ``--module``...): the old
#: spelling still works outside torchrun, with a notice, but is not an option of the parser.
RENAMED = {"--m": "--group-size"}


def _renamed(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name in RENAMED:
            print(f"sam-diagnostics: note: {name} is now {RENAMED[name]} (the old name "
                  "cannot pass through torchrun)", file=sys.stderr)
            arg = RENAMED[name] + eq + value
        out.append(arg)
    return out


_COMMANDS = {"train": _cmd_train, "sweep": _cmd_sweep, "summary": _cmd_summary,
             "plot": _cmd_plot, "validate": _cmd_validate}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sam-diagnostics`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    argv = _renamed(list(sys.argv[1:] if argv is None else argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error (already printed)
        return done.code if isinstance(done.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return _COMMANDS[args.command](args)
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (_Fail, ConfigError, NotARunError, EmptyRunError, OSError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"sam-diagnostics {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sam-diagnostics {args.command}: interrupted (finished records are kept)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

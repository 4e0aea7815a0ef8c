"""The label-noise study: SGD, 1-SAM, L-SAM, J-SAM, regularized SGD and the adaptive
(J-SAM-matched) regularizer under 30% label noise, on MNIST-1D and digits, MLP and CNN.

Protocol (details in ``analyses/study/protocol.py`` and the generated report):

1. **tuning** on three tuning seeds (each with its own noisy validation split; never reused
   for final runs), short runs with probes reduced to a few examples; the score is the peak of
   the 5-epoch moving average of validation accuracy; values within one paired standard error
   of the best are *tied* and the middle of the tied range is taken (stated rule, no test data);
2. **main**: every SAM variant at 1-SAM's chosen ρ (the paper's ablation) and SGD, on five
   fresh seeds, evaluated every epoch; then regularized SGD and the adaptive regularizer,
   L-SAM / J-SAM at their own ρ, weight decay 5e-4, and the training-size and width ablations;
3. **report**: best test (the paper's metric) and test at the best-validation epoch with paired
   95% intervals over seeds; mechanism quantities at each method's early-stopping epoch.

Stages can be selected and resumed (finished runs are never retrained)::

    python analyses/label_noise.py --quick --out study-out            # README, ~5 min
    python analyses/label_noise.py --out study-out/full --docs docs   # everything (hours)
    python analyses/label_noise.py --out study-out/full --settings mnist1d-mlp \\
        --stage tune-sam main tune-reg reg --jobs 1 --no-report
    python analyses/label_noise.py --out study-out/full --docs docs --stage report
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `analyses` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses.study.driver import Study  # noqa: E402
from analyses.study.protocol import QUICK, QUICK_METHODS, SETTINGS, STAGES  # noqa: E402
from analyses.study.runs import run_all  # noqa: E402


def quick_runs(epochs: int, seeds: int):
    """The README's quick study: five methods at the study notes' ρ and γ, no tuning."""
    s = dataclasses.replace(QUICK, epochs=epochs or QUICK.epochs)
    group = f"final/{s.name}"
    runs = []
    for method in QUICK_METHODS:
        for seed in range(seeds):
            kw = {"rho": s.rho["sam"][0]} if method in ("sam", "lsam", "jsam") else {}
            if method == "regsgd":
                kw = {"gamma_act": s.gammas[0], "gamma_weight": s.gammas[0]}
            runs.append(s.run(method, seed, group=group, **kw))
    return s, runs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="study folder (runs, tables, figures)")
    parser.add_argument("--quick", action="store_true",
                        help="MNIST-1D MLP, 5 methods, 3 seeds, 60 epochs, fixed ρ/γ (minutes)")
    parser.add_argument("--docs", default=None,
                        help="write the report to DOCS/reproducing.md, figures under DOCS")
    parser.add_argument("--settings", nargs="+", default=None, choices=list(SETTINGS),
                        help="data set × model settings (default: all four)")
    parser.add_argument("--stage", nargs="+", default=None, choices=[*STAGES, "report"],
                        help="stages to run, in order (default: all, then the report)")
    parser.add_argument("--no-report", action="store_true", help="train only")
    parser.add_argument("--seeds", type=int, default=None, help="quick study: number of seeds")
    parser.add_argument("--epochs", type=int, default=None, help="quick study: epochs")
    parser.add_argument("--jobs", type=int, default=2, help="parallel training processes")
    args = parser.parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    from analyses.study import report as rep

    if args.quick:
        setting, runs = quick_runs(args.epochs, args.seeds or 3)
        print(f"== {setting.name}: quick study, {len(runs)} runs of {setting.epochs} epochs",
              flush=True)
        run_all(runs, root, jobs=args.jobs)
        return rep.quick_report(root, setting, runs, time.perf_counter() - start)

    settings = [SETTINGS[n] for n in (args.settings or SETTINGS)]
    stages = args.stage or [*STAGES, "report"]
    if any(stage != "report" for stage in stages):
        rep.log_invocation(root, argv if argv is not None else sys.argv[1:])
    for setting in settings:
        study = Study(root, setting, jobs=args.jobs, log=lambda m: print(m, flush=True))
        for stage in stages:
            if stage != "report":
                study.stage(stage)
    if args.no_report or (args.stage and "report" not in args.stage):
        return {}
    docs = Path(args.docs) if args.docs else None
    return rep.full_report(root, docs, settings, argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()

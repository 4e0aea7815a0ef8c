"""Stages of the study: which runs each trains and what the tuning stages choose.

``Study(root, setting, jobs)``; every stage method trains what is missing (resumable) and
returns the runs it defines. Choices of the tuning stages are recomputed from the finished
tuning runs (and cached in ``root/choices.json`` for the report).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .protocol import ABLATION_SEEDS, EXTENSIONS, FINAL_SEEDS, TUNE_SEEDS, WEIGHT_DECAY, Setting
from .runs import Run, finished, run_all
from .stats import run_metrics, select


class Study:
    def __init__(self, root: Path, setting: Setting, *, jobs: int = 1, log=print,
                 train: bool = True):
        self.root, self.s, self.jobs, self.log, self.train = Path(root), setting, jobs, log, train

    # ------------------------------------------------------------------ helpers
    def _go(self, runs: list[Run]) -> list[Run]:
        if self.train:
            run_all(runs, self.root, jobs=self.jobs, log=self.log)
        return runs

    def _scores(self, runs: list[Run], key) -> dict:
        scores: dict = {}
        for r, summary in finished(runs, self.root):
            scores.setdefault(key(r), {})[r.seed] = run_metrics(summary)["val_peak"]
        return scores

    def _save_choice(self, name: str, result: dict) -> None:
        path = self.root / "choices.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data.setdefault(self.s.name, {})[name] = result
        # atomic: settings may train in parallel processes sharing one root (the report
        # recomputes every choice from the runs, so a lost update costs nothing)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)

    def _tuning_runs(self, variant: str, axes: tuple) -> tuple[list, list[Run], object]:
        """(grid, runs, key of a run's grid value) of ``variant`` on the tuning seeds."""
        group = f"tune/{self.s.name}"
        if variant == "regsgd":
            grid = [(a, v) for a in axes[0] for v in axes[1]]
            runs = [self.s.run("regsgd", seed, group=group, tuning=True, gamma_act=g[0],
                               gamma_weight=g[1]) for g in grid for seed in TUNE_SEEDS]
            return grid, runs, lambda r: (r.gamma_act, r.gamma_weight)
        grid = list(axes[0])
        runs = [self.s.run(variant, seed, group=group, tuning=True, rho=rho)
                for rho in grid for seed in TUNE_SEEDS]
        return grid, runs, lambda r: r.rho

    def tune(self, variant: str) -> dict:
        """Tune ``variant`` ("sam", "lsam", "jsam", "adareg" over ρ; "regsgd" over γ).

        Grid rule: when the chosen or the best-scoring value sits at an end of an axis, that
        axis is extended one geometric step beyond the end (``a²/b`` for the two outermost
        values ``a, b``, one significant digit) and the tuning seeds are trained there; at
        most ``EXTENSIONS`` times per axis end. The report recomputes the same grid from the runs.
        """
        if variant == "regsgd":
            axes = (tuple(self.s.gammas), tuple(self.s.gammas_v or self.s.gammas))
        else:
            axes = (tuple(self.s.rho[variant]),)
        extended: dict = {}
        while True:
            grid, runs, key = self._tuning_runs(variant, axes)
            if extended:
                self.log(f"== {self.s.name}: tuning {variant}, grid extended: "
                         + ", ".join(f"{k} {v}x" for k, v in extended.items()))
            else:
                self.log(f"== {self.s.name}: tuning {variant} ({len(grid)} values x "
                         f"{len(TUNE_SEEDS)} seeds, {self.s.tune_epochs} epochs)")
            self._go(runs)
            result = select(self._scores(runs, key), grid)
            choice = result["choice"]
            if choice is None:
                break
            values = choice if variant == "regsgd" else (choice,)
            # the chosen value or the best-scoring one at an end of an axis: the optimum may
            # lie beyond it, so that axis grows one step past that end
            ends = {(i, "lower" if v == axis[0] else "upper")
                    for point in (values, result["best"] if variant == "regsgd"
                                  else (result["best"],))
                    for i, (v, axis) in enumerate(zip(point, axes))
                    if len(axis) > 1 and v in (axis[0], axis[-1])}
            grown = {}
            for i, end in sorted(ends):
                if extended.get((i, end), 0) >= EXTENSIONS:
                    continue
                axis = grown.get(i, axes[i])
                a, b = (axis[0], axis[1]) if end == "lower" else (axis[-1], axis[-2])
                grown[i] = tuple(sorted({*axis, float(f"{a * a / b:.1g}")}))
                extended[(i, end)] = extended.get((i, end), 0) + 1
            if not grown:
                break
            axes = tuple(grown.get(i, axis) for i, axis in enumerate(axes))
        # SGD on the same tuning seeds, as a reference row for the validation table
        group = f"tune/{self.s.name}"
        self._go([self.s.run("sgd", seed, group=group, tuning=True) for seed in TUNE_SEEDS])
        result["grid"] = list(grid)
        names = ("γ_a", "γ_V") if variant == "regsgd" else ("ρ",)
        result["extended"] = {f"{names[i]} {end}": n for (i, end), n in extended.items()}
        result["complete"] = len(finished(runs, self.root)) == len(runs)
        if choice is not None:
            ends = [f"{n} = {v:g} ({'lower' if v == min(ax) else 'upper'} end)"
                    for n, v, ax in zip(names, values, axes) if v in (min(ax), max(ax))]
            result["on_edge"] = "; ".join(ends) if ends else False
        sgd = self._scores([self.s.run("sgd", seed, group=group, tuning=True)
                            for seed in TUNE_SEEDS], lambda r: "sgd")
        result["sgd_val"] = sgd.get("sgd", {})
        self._save_choice(variant, result)
        return result

    def choice(self, variant: str):
        return self.tune(variant)["choice"]

    # ------------------------------------------------------------------ stages
    def final_runs(self, stage: str) -> list[Run]:
        """The runs of a non-tuning stage (training them if ``train``)."""
        s, g = self.s, f"final/{self.s.name}"
        seeds = FINAL_SEEDS
        if stage == "main":
            rho = self.choice("sam")
            runs = [s.run("sgd", k, group=g, rho=rho) for k in seeds]
            runs += [s.run(v, k, group=g, rho=rho) for v in ("sam", "lsam", "jsam")
                     for k in seeds]
        elif stage == "reg":
            rho = self.choice("sam")
            gamma = self.choice("regsgd")
            runs = [s.run("regsgd", k, group=g, gamma_act=gamma[0], gamma_weight=gamma[1],
                          rho=rho) for k in seeds]
        elif stage == "ada":
            rho = self.choice("sam")
            ada = self.choice("adareg")
            runs = [s.run("adareg", k, group=g, rho=r) for r in dict.fromkeys((ada, rho))
                    for k in seeds]
        elif stage == "var":
            runs = [s.run(v, k, group=g, rho=self.choice(v)) for v in ("lsam", "jsam")
                    for k in seeds]
        elif stage == "wd":
            rho = self.choice("sam")
            runs = [s.run("sgd", k, group=g + "-wd", weight_decay=WEIGHT_DECAY, rho=rho)
                    for k in seeds]
            runs += [s.run("sam", k, group=g + "-wd", rho=rho, weight_decay=WEIGHT_DECAY)
                     for k in seeds]
        elif stage in ("size", "width"):
            rho = self.choice("sam")
            runs = []
            values = s.sizes if stage == "size" else s.widths
            for value in values:
                kw = {"n_samples": value} if stage == "size" else {"width": value}
                default = (value is None) if stage == "size" else (value == 256)
                group = g if default else f"{g}-{stage}"  # the default point is the main run
                for k in ABLATION_SEEDS:
                    runs.append(s.run("sgd", k, group=group, rho=rho, **kw))
                    runs.append(s.run("sam", k, group=group, rho=rho, **kw))
        else:
            raise ValueError(f"unknown stage {stage!r}")
        if stage in ("size", "width") and not (s.sizes if stage == "size" else s.widths):
            return []
        self.log(f"== {self.s.name}: {stage} ({len(runs)} runs, {s.epochs} epochs)")
        return self._go(runs)

    def stage(self, name: str):
        if name.startswith("tune-"):
            variants = {"tune-sam": ("sam",), "tune-reg": ("regsgd",),
                        "tune-ada": ("adareg",), "tune-var": ("lsam", "jsam")}[name]
            return [self.tune(v) for v in variants]
        return self.final_runs(name)

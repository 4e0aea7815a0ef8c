"""Runs of the study: one :class:`Run` = one ``TrainConfig`` and one zarr store, resumable.

A finished run (store marked ``complete``) is never trained again; a killed one is deleted and
rerun. Each finished run also gets a small JSON summary next to its store (curves per epoch and
the mechanism quantities per record) so that reports do not reopen hundreds of stores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CURVE_NAMES = ("val_accuracy", "test_accuracy", "clean_train_accuracy", "noisy_train_accuracy",
               "train_loss")


@dataclass(frozen=True)
class Run:
    """One training run of the study (fields map onto ``TrainConfig``)."""

    dataset: str
    model: str
    optimizer: str
    seed: int
    epochs: int
    rho: float = 0.05
    gamma_act: float = 1e-2
    gamma_weight: float = 1e-2
    weight_decay: float = 0.0
    n_samples: int | None = None
    width: int = 256
    probe_size: int = 256
    group: str = "final"  # folder under the study root

    @property
    def name(self) -> str:
        parts = [self.optimizer]
        if self.optimizer in ("sam", "lsam", "jsam", "adareg"):
            parts.append(f"rho{self.rho:g}")
        else:  # ρ is only the radius of the probe's SAM view
            parts.append(f"probe{self.rho:g}")
        if self.optimizer == "regsgd":
            parts.append(f"ga{self.gamma_act:g}-gv{self.gamma_weight:g}")
        if self.weight_decay:
            parts.append(f"wd{self.weight_decay:g}")
        if self.n_samples:
            parts.append(f"n{self.n_samples}")
        if self.width != 256:
            parts.append(f"w{self.width}")
        parts.append(f"s{self.seed}")
        return "-".join(parts)

    def path(self, root: Path) -> Path:
        return Path(root) / self.group / f"{self.name}.zarr"

    def config(self):
        from sam_diagnostics.train import TrainConfig

        return TrainConfig(dataset=self.dataset, model=self.model, optimizer=self.optimizer,
                           seed=self.seed, epochs=self.epochs, rho=self.rho,
                           gamma_act=self.gamma_act, gamma_weight=self.gamma_weight,
                           weight_decay=self.weight_decay, n_samples=self.n_samples,
                           width=self.width, probe_size=self.probe_size, record_every=1)


def commit() -> str:
    """The short git commit of this checkout ("unknown" outside git)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], text=True,
                              cwd=Path(__file__).resolve().parent, capture_output=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _summary_path(store: Path) -> Path:
    return store.with_suffix(".json")


def summarize_store(store: Path) -> dict:
    """Curves per record and the mechanism quantities of one stored run (JSON-ready)."""
    import sam_diagnostics as sd

    ds = sd.open_run(store)
    out = {"attrs": {k: (v.item() if hasattr(v, "item") else v) for k, v in ds.attrs.items()
                     if isinstance(v, (int, float, str, np.integer, np.floating))},
           "epoch": np.asarray(ds["epoch"].values, float).tolist()}
    for name in CURVE_NAMES:
        if name in ds:
            out[name] = np.asarray(ds[name].values, float).tolist()
    if "last_layer_weight_norm" in ds:
        out["last_layer_weight_norm"] = np.asarray(ds["last_layer_weight_norm"].values,
                                                   float).tolist()
    if "activation_norm" in ds:
        act = ds["activation_norm"].sel(view="sgd").isel(layer=-1)
        out["penultimate_activation_norm"] = act.mean("example").values.tolist()
    noisy = np.asarray(ds["is_noisy"].values, bool)
    for var in ("logit_scale", "jacobian_norm"):
        if var in ds and "view" in ds[var].dims:
            da = ds[var]
            if "layer" in da.dims:
                continue
            ratio = (da.sel(view="sam") / da.sel(view="sgd")).values  # [step, example]
            with np.errstate(all="ignore"):
                for subset, mask in (("clean", ~noisy), ("noisy", noisy)):
                    # geometric mean over examples: robust to the rare runaway ratio
                    vals = np.exp(np.nanmean(np.log(ratio[:, mask]), axis=1))
                    out[f"{var}_ratio_{subset}"] = vals.tolist()
    return out


def load_summary(store: Path) -> dict | None:
    """The JSON summary of a finished run (written on first use), or None if not finished."""
    js = _summary_path(store)
    if js.exists():
        return json.loads(js.read_text())
    if not store.exists():
        return None
    import sam_diagnostics as sd

    try:
        ds = sd.open_run(store, load=False)
        complete = bool(ds.attrs.get("complete", 0))
        ds.close()
    except (OSError, ValueError, KeyError):
        return None
    if not complete:
        return None
    summary = summarize_store(store)
    js.write_text(json.dumps(summary, allow_nan=True))
    return summary


def _train_one(run: Run, root: str) -> tuple[str, float]:
    import torch

    from sam_diagnostics.train import train

    torch.set_num_threads(1)
    store = run.path(Path(root))
    if load_summary(store) is not None:
        return run.name, 0.0
    if store.exists():  # killed earlier: start again
        shutil.rmtree(store)
        _summary_path(store).unlink(missing_ok=True)
    store.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train(run.config(), store, progress=False)
    seconds = time.perf_counter() - start
    summary = summarize_store(store)
    summary["seconds"] = seconds
    summary["commit"] = commit()
    _summary_path(store).write_text(json.dumps(summary, allow_nan=True))
    return run.name, seconds


def run_all(runs: Sequence[Run], root: Path, *, jobs: int = 1, log=print) -> float:
    """Train every run that is not finished yet (``jobs`` processes); returns train seconds."""
    todo = [r for r in dict.fromkeys(runs) if load_summary(r.path(root)) is None]
    if not todo:
        return 0.0
    log(f"  {len(todo)} runs to train ({len(runs) - len(todo)} already done)")
    total = 0.0
    if jobs <= 1:
        for i, r in enumerate(todo, 1):
            name, sec = _train_one(r, str(root))
            total += sec
            log(f"  [{i}/{len(todo)}] {r.group}/{name}: {sec:.0f} s")
        return total
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_train_one, r, str(root)) for r in todo]
        for i, (r, fut) in enumerate(zip(todo, futures), 1):
            name, sec = fut.result()
            total += sec
            log(f"  [{i}/{len(todo)}] {r.group}/{name}: {sec:.0f} s")
    return total


def finished(runs: Iterable[Run], root: Path) -> list[tuple[Run, dict]]:
    """The finished runs among ``runs`` with their summaries."""
    out = []
    for r in dict.fromkeys(runs):
        s = load_summary(r.path(root))
        if s is not None:
            out.append((r, s))
    return out


def compute_seconds(root: Path) -> tuple[float, int, int]:
    """Total training seconds, number of runs with a recorded time, and number of finished runs
    without one (e.g. summarized after a restart), from the run summaries under ``root``."""
    total, n, untimed = 0.0, 0, 0
    for js in Path(root).rglob("*.json"):
        if not js.with_suffix(".zarr").exists():  # not a run summary (choices, costs)
            continue
        try:
            sec = json.loads(js.read_text()).get("seconds")
        except (OSError, ValueError):
            continue
        if isinstance(sec, (int, float)) and math.isfinite(sec):
            total += sec
            n += 1
        else:
            untimed += 1
    return total, n, untimed


def replace(run: Run, **changes) -> Run:
    return dataclasses.replace(run, **changes)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

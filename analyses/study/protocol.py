"""The study's protocol: settings, grids, seeds and stages (what runs, in which order).

Stages, in priority order (each resumable; a stage trains the tuning it depends on first):

======== ===================================================================================
tune-sam  1-SAM's ρ on the tuning seeds (short tuning runs, probes reduced to a few examples)
main      SGD, 1-SAM, L-SAM and J-SAM, all at 1-SAM's ρ (the paper's ablation), fresh seeds
tune-ada  the adaptive regularizer's ρ grid
ada       the adaptive regularizer at its tuned ρ and at 1-SAM's ρ, fresh seeds
tune-reg  regularized SGD's (γ_a, γ_V) grid
reg       regularized SGD at its tuned (γ_a, γ_V), fresh seeds
tune-var  L-SAM's and J-SAM's own ρ grids
var       L-SAM and J-SAM at their own ρ (the practitioner's table), fresh seeds
wd        SGD and 1-SAM with weight decay 5e-4 (the post-memorization reversal)
size      training-set size ablation, SGD vs 1-SAM at 1-SAM's ρ
width     MLP width ablation, SGD vs 1-SAM at 1-SAM's ρ
======== ===================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from .runs import Run

STAGES = ("tune-sam", "main", "tune-ada", "ada", "tune-reg", "reg", "tune-var", "var", "wd",
          "size", "width")

TUNE_SEEDS = (100, 101, 102)  # never used for final runs; each seed has its own split
FINAL_SEEDS = (0, 1, 2, 3, 4)
ABLATION_SEEDS = (0, 1, 2)
WEIGHT_DECAY = 5e-4
#: a tuning grid whose chosen value sits at an end grows one step past it, at most this often
EXTENSIONS = 2
TUNE_PROBE = 8  # probe examples during tuning (probes "off": the recorder needs >= 1)
# γ_a = 1e-3 and γ_V = 3e-2 won on the 3 x 3 grid of MNIST-1D MLP: each axis goes one further
GAMMAS = (1e-4, 1e-3, 1e-2, 3e-2)
GAMMAS_V = (1e-3, 1e-2, 3e-2, 1e-1)


@dataclass
class Setting:
    """One data set × model with its training lengths and grids."""

    dataset: str
    model: str
    epochs: int
    tune_epochs: int
    rho: dict  # grid per variant: "sam", "lsam", "jsam", "adareg"
    gammas: tuple = GAMMAS
    gammas_v: tuple | None = GAMMAS_V  # None = the same values as γ_a
    sizes: tuple = ()
    widths: tuple = ()
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.model}"

    @property
    def gamma_grid(self) -> tuple:
        return tuple((a, v) for a in self.gammas for v in (self.gammas_v or self.gammas))

    def run(self, optimizer: str, seed: int, *, group: str, tuning: bool = False,
            **kw) -> Run:
        return Run(self.dataset, self.model, optimizer, seed,
                   self.tune_epochs if tuning else self.epochs,
                   probe_size=TUNE_PROBE if tuning else 256, group=group, **kw)


_MLP_RHO = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1)
_CNN_RHO = (0.005, 0.01, 0.02, 0.03, 0.05)
_DIGITS_RHO = (0.01, 0.03, 0.05, 0.1, 0.2)

SETTINGS = {s.name: s for s in (
    Setting("mnist1d", "mlp", 200, 100,
            {"sam": _MLP_RHO, "jsam": _MLP_RHO, "lsam": (0.02, 0.05, 0.1, 0.2, 0.3, 0.5),
             "adareg": (0.02, 0.05, 0.1, 0.2, 0.5)},
            sizes=(1000, 2000, None), widths=(64, 256, 1024)),
    Setting("mnist1d", "cnn", 100, 60,
            {"sam": _CNN_RHO, "jsam": _CNN_RHO, "lsam": (0.01, 0.03, 0.05, 0.1, 0.2),
             "adareg": (0.02, 0.05, 0.1, 0.2, 0.5)}),
    Setting("digits", "mlp", 100, 60,
            {"sam": _DIGITS_RHO, "jsam": _DIGITS_RHO, "lsam": (0.03, 0.1, 0.2, 0.3, 0.5),
             "adareg": (0.02, 0.05, 0.1, 0.2, 0.5)}),
    Setting("digits", "cnn", 60, 40,
            {"sam": _DIGITS_RHO, "jsam": _DIGITS_RHO, "lsam": (0.03, 0.1, 0.2, 0.3, 0.5),
             "adareg": (0.02, 0.05, 0.1, 0.2, 0.5)},
            note="digits-cnn is a Conv1d over the 64 flattened pixels of the 8x8 image"),
)}

#: The README's quick study: no tuning, ρ and γ from the study notes, 3 seeds, 60 epochs.
QUICK = Setting("mnist1d", "mlp", 60, 60, {v: (0.05,) for v in ("sam", "lsam", "jsam")},
                gammas=(1e-2,), gammas_v=None)
QUICK_METHODS = ("sgd", "sam", "lsam", "jsam", "regsgd")

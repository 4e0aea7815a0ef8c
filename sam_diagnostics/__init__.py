"""sam_diagnostics: per-example diagnostics and optimizers for SAM under label noise."""

from . import accessor as _accessor  # noqa: F401 - registers the ``ds.sd`` accessor
from . import live
from ._version import __version__
from .engine import Engine
from .errors import NonFiniteError, Unsupported
from .jacobian import grad_norms, jacobian_norms
from .logit_terms import logit_scale, logit_term, margin, per_example_loss
from .optim import SAM, RegularizedSGD, SGDStep, make_optimizer
from .perturb import epsilon, group_slices, perturbed, sam_epsilon
from .probe import Probe
from .record import Recorder
from .rules import register_rule
from .runs import merge_runs, open_run, open_runs, to_netcdf, validate_run
from .train import TrainConfig, train

__all__ = [
    "__version__",
    "Engine",
    "NonFiniteError",
    "Unsupported",
    "epsilon",
    "live",
    "grad_norms",
    "jacobian_norms",
    "logit_scale",
    "logit_term",
    "margin",
    "per_example_loss",
    "Probe",
    "SAM",
    "RegularizedSGD",
    "SGDStep",
    "make_optimizer",
    "group_slices",
    "perturbed",
    "sam_epsilon",
    "register_rule",
    "Recorder",
    "open_run",
    "merge_runs",
    "open_runs",
    "to_netcdf",
    "validate_run",
    "train",
    "TrainConfig",
]

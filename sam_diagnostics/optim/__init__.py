"""Optimizers: the SAM family, regularized SGD and the plain SGD step, one interface.

Every stepper has ``step(inputs, targets) -> mean loss at w`` and wraps a torch optimizer
(``.base_optimizer``), so schedulers and checkpoints work as usual.
"""

from __future__ import annotations

import torch
from torch import nn

from ..schema import OPTIMIZER_NAMES
from .regularized import AdaptiveRegularizedSGD, RegularizedSGD, SGDStep
from .sam import SAM, VARIANTS

__all__ = ["SAM", "VARIANTS", "RegularizedSGD", "AdaptiveRegularizedSGD", "SGDStep", "OPTIMIZERS",
           "make_optimizer"]

OPTIMIZERS = OPTIMIZER_NAMES  # one list, in the torch-free schema


def make_optimizer(name: str, model: nn.Module, *, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0, rho: float = 0.05, m: int | None = 1,
                   gamma_act: float = 1e-2, gamma_weight: float = 1e-2, loss_fn=None):
    """A stepper by name over ``torch.optim.SGD(lr, momentum, weight_decay)``.

    ``"sgd"`` plain SGD; ``"sam"``, ``"lsam"``, ``"jsam"`` the SAM variants with radius ``rho``
    and group size ``m`` (1 = 1-SAM); ``"regsgd"`` SGD with the activation / last-layer weight
    penalties ``gamma_act`` / ``gamma_weight``; ``"adareg"`` SGD with the J-SAM-matched
    per-example penalty of radius ``rho`` (:class:`AdaptiveRegularizedSGD`).

    Examples
    --------
    >>> net = nn.Linear(4, 3)
    >>> opt = make_optimizer("jsam", net, lr=0.05, rho=0.05, m=1)
    >>> type(opt).__name__, opt.variant
    ('SAM', 'jsam')
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    base = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                           momentum=momentum, weight_decay=weight_decay)
    if name == "sgd":
        return SGDStep(model, base, loss_fn=loss_fn)
    if name == "regsgd":
        return RegularizedSGD(model, base, gamma_act, gamma_weight, loss_fn=loss_fn)
    if name == "adareg":
        return AdaptiveRegularizedSGD(model, base, rho=rho, loss_fn=loss_fn)
    return SAM(model, base, rho=rho, m=m, variant=name, loss_fn=loss_fn)

"""The logit term and the per-example quantities that depend only on the logits (SPEC 2.3).

For a cross-entropy head with logits ``z_i`` (``[B, C]``) and integer target ``y_i``, the
gradient of the loss with respect to the logits is the *logit term*
``δ_i = softmax(z_i) − onehot(y_i)`` and the *logit scale* is ``‖δ_i‖₂``. For a binary logistic
head (one logit ``f_i`` per example, targets in {0, 1}, signed label ``s_i = 2 y_i − 1``) the loss
is ``log(1 + exp(−s_i f_i))``, the logit term is ``−s_i σ(−s_i f_i)`` and the logit scale is
``σ(−s_i f_i)``.

Every function validates its input (:func:`check_head`) and returns per-example values, never
reduced and never scaled by ``1/B``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import NonFiniteError

__all__ = ["check_head", "per_example_loss", "logit_term", "logit_scale", "margin", "is_binary"]


def is_binary(logits: Tensor) -> bool:
    """True for a binary logistic head: logits of shape ``[B]`` or ``[B, 1]``."""
    return logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1)


def check_head(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Validate ``(logits, targets)`` and return them in canonical form.

    Multiclass: ``logits [B, C]`` (C ≥ 2) and integer ``targets [B]`` in ``[0, C)``.
    Binary: ``logits [B]`` or ``[B, 1]`` and ``targets [B]`` in {0, 1} (integer, bool or float);
    returned as ``logits [B]`` and float ``targets [B]``.

    Raises
    ------
    TypeError, ValueError
        With a message naming the argument and how to fix it.
    """
    if not isinstance(logits, Tensor) or not isinstance(targets, Tensor):
        raise TypeError("logits and targets must be torch.Tensor objects")
    if logits.dim() not in (1, 2):
        raise ValueError(
            f"logits must have shape [B, C] (multiclass) or [B] / [B, 1] (binary), got "
            f"{tuple(logits.shape)}; use output_fn to select or reshape the model's logits"
        )
    if logits.shape[0] == 0:
        raise ValueError("empty batch: logits have 0 rows; pass at least one example")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets must have shape [B] = [{logits.shape[0]}] to match logits "
            f"{tuple(logits.shape)}, got {tuple(targets.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if not torch.isfinite(logits).all():
        bad = ~torch.isfinite(logits)
        bad = bad.any(dim=-1) if bad.dim() == 2 else bad
        idx = torch.nonzero(bad).flatten()[:5].tolist()
        raise NonFiniteError(
            f"logits contain NaN or Inf (examples {idx}...); the model diverged or the input "
            "contains non-finite values — lower the learning rate or check the data"
        )
    if is_binary(logits):
        logits = logits.reshape(-1)
        if not ((targets == 0) | (targets == 1)).all():
            raise ValueError(
                "a binary head (logits [B] or [B, 1]) needs targets in {0, 1}; got values "
                f"{torch.unique(targets)[:5].tolist()}; map labels {{-1, +1}} with (y + 1) / 2"
            )
        return logits, targets.to(logits.dtype)
    num_classes = logits.shape[1]
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(
            f"a multiclass head needs integer class indices as targets, got dtype {targets.dtype}; "
            "pass targets.long() (soft/one-hot targets are not supported)"
        )
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(
            f"targets must lie in [0, {num_classes}) for logits with {num_classes} classes, got "
            f"min {int(targets.min())}, max {int(targets.max())}"
        )
    return logits, targets.long()  # any integer dtype (int32 from numpy, uint8 ...)


def per_example_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-example cross-entropy (multiclass) or logistic loss (binary), shape ``[B]``.

    Examples
    --------
    >>> z = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> per_example_loss(z, torch.tensor([0, 0])).shape
    torch.Size([2])
    """
    return _loss_unchecked(*check_head(logits, targets))


def _loss_unchecked(logits: Tensor, targets: Tensor) -> Tensor:
    """:func:`per_example_loss` without validation, for use inside torch.func transforms."""
    if is_binary(logits):
        return F.binary_cross_entropy_with_logits(
            logits.reshape(-1), targets.to(logits.dtype), reduction="none")
    return F.cross_entropy(logits, targets, reduction="none")


per_example_loss.unchecked = _loss_unchecked


def logit_term(logits: Tensor, targets: Tensor) -> Tensor:
    """The logit term ``δ_i = ∂ℓ_i/∂z_i`` (SPEC 2.3), shape ``[B, C]`` or ``[B]`` (binary).

    Multiclass: ``softmax(z_i) − onehot(y_i)``. Binary: ``σ(f_i) − y_i`` which equals
    ``−s_i σ(−s_i f_i)`` with ``s_i = 2 y_i − 1``.
    """
    logits, targets = check_head(logits, targets)
    # Computed without cancellation: for a confident correct example 1 − p_y is summed from the
    # other classes' probabilities, never subtracted from 1 (relative accuracy at any margin).
    if logits.dim() == 1:
        return torch.where(targets == 1, -torch.sigmoid(-logits), torch.sigmoid(logits))
    p = torch.softmax(logits, dim=1)
    idx = targets[:, None]
    rest = p.scatter(1, idx, 0.0).sum(dim=1, keepdim=True)
    return p.scatter(1, idx, -rest)


def logit_scale(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-example logit scale, shape ``[B]``: ``‖δ_i‖₂`` (multiclass) or ``σ(−s_i f_i)`` (binary).

    Parameters
    ----------
    logits : Tensor
        ``[B, C]`` multiclass logits, or ``[B]`` / ``[B, 1]`` binary logits.
    targets : Tensor
        ``[B]`` integer class indices (multiclass) or {0, 1} labels (binary).

    Examples
    --------
    >>> logit_scale(torch.tensor([0.0]), torch.tensor([1]))
    tensor([0.5000])
    """
    delta = logit_term(logits, targets)
    if delta.dim() == 1:
        return delta.abs()
    # scaled norm: the squares of tiny entries would underflow (float32 below ~1e-19)
    big = delta.abs().amax(dim=1, keepdim=True)
    return big[:, 0] * (delta / big.clamp_min(torch.finfo(delta.dtype).tiny)).norm(dim=1)


def margin(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-example margin ``z_{i,y} − max_{c≠y} z_{i,c}`` (binary: ``s_i f_i``), shape ``[B]``."""
    logits, targets = check_head(logits, targets)
    if logits.dim() == 1:
        return (2 * targets - 1) * logits
    true = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf"))
    return true - others.max(dim=1).values

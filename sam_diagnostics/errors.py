"""The library's own exceptions: typed, so callers never match on message strings."""

from __future__ import annotations

__all__ = ["NotFastError", "NonFiniteError", "Unsupported"]


class NotFastError(Exception):
    """The per-layer path cannot be exact for this model or call (internal: the engine then uses
    the exact torch.func path; ``method="fast"`` turns it into a ``ValueError``)."""


class NonFiniteError(ValueError):
    """The model's logits (or the loss) contain NaN or Inf: the model has diverged."""


class Unsupported(NotImplementedError):
    """No exact path exists for this model or call; the message names the module and the way
    out."""

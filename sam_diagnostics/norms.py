"""Activation and weight norms (SPEC 2.3) and finding the model's final linear layer.

For the final linear layer ``z = V a + b`` the Jacobian block with respect to ``V`` has
``‖·‖_F² = C ‖a‖²`` and the Jacobian with respect to ``a`` is ``V``: the penultimate activation
norm and the last-layer weight norm are exactly these two blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import NonFiniteError

__all__ = ["find_head", "weight_norms", "resolve_layers"]


#: autograd nodes that only select or reshape (no arithmetic): the logits may be the head's
#: output through these (``out[:, 0]``, GPT-2's last-token ``logits[arange(B), lengths]``)
_VIEW_NODES = ("View", "Reshape", "Squeeze", "Unsqueeze", "Select", "Slice", "Clone",
               "Expand", "Alias", "Contiguous", "ToCopy", "Index", "Gather")


def _is_output_of(logits: Tensor, out: Tensor) -> bool:
    """Whether ``logits`` is ``out`` up to views, reshapes and selections (no arithmetic)."""
    if out.grad_fn is None or logits.grad_fn is None:
        return logits.numel() == out.numel() and torch.equal(logits.reshape(-1), out.reshape(-1))
    node = logits.grad_fn
    while node is not None:
        if node is out.grad_fn:
            return True
        if not type(node).__name__.startswith(_VIEW_NODES):
            return False
        nxt = [f for f, _ in node.next_functions if f is not None]
        node = nxt[0] if len(nxt) == 1 else None
    return False


def find_head(model: nn.Module, inputs: Tensor, output_fn=None) -> str:
    """Name of the final ``nn.Linear``: the last one called, whose output *is* the logits.

    Runs one forward on the first example. Raises ``ValueError`` naming ``head=`` /
    ``output_fn=`` if no linear layer runs, or if the last one called is not the last
    computation on the logits (a temperature, a custom Parameter head or a functional head
    follows it): the diagnostics would measure the wrong layer.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> find_head(net, torch.randn(2, 4))
    '2'
    """
    from .engine import call_model

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    order: list[tuple[str, Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: order.append((n, o)))
               for n, m in linears.items()]
    try:
        with torch.enable_grad():
            logits = call_model(model, inputs[:1], output_fn)
    finally:
        for h in handles:
            h.remove()
    if not torch.isfinite(logits).all():
        raise NonFiniteError("the model's logits contain NaN or Inf; the model has diverged or "
                             "the input is not finite")
    if not order:
        raise ValueError(
            "no linear head found: no nn.Linear ran in the forward pass. The diagnostics need a "
            "final linear layer z = V a + b; pass head='<module name>' naming it"
        )
    name, out = order[-1]
    if not _is_output_of(logits, out) or sum(n == name for n, _ in order) > 1:
        raise ValueError(
            f"cannot identify the final linear layer: the last nn.Linear called, {name!r}, is "
            "not the last computation on the logits (something follows it: a temperature, a "
            "Parameter or functional head, a second call). Pass head='<module name>' naming the "
            "final linear layer z = V a + b, or output_fn=... if the logits need selecting"
        )
    return name


def resolve_layers(model: nn.Module, names) -> dict[str, nn.Module]:
    """``{name: module}`` for the given module names, with a clear error for unknown names."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        near = [n for n in modules if n][:12]
        raise ValueError(f"unknown layer name(s) {missing}; the model has modules {near}...")
    return {n: modules[n] for n in names}


def weight_norms(model: nn.Module) -> dict[str, Tensor]:
    """Frobenius norm of the ``weight`` of every module that has one, ``{module name: scalar}``."""
    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            w = getattr(module, "weight", None)  # parametrized / derived weights included
            if isinstance(w, Tensor):
                out[name] = w.detach().norm()
    return out


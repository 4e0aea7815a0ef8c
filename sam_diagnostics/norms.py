"""Activation and weight norms (SPEC 2.3) and finding the model's final linear layer.

For the final linear layer ``z = V a + b`` the Jacobian block with respect to ``V`` has
``‖·‖_F² = C ‖a‖²`` and the Jacobian with respect to ``a`` is ``V``: the penultimate activation
norm and the last-layer weight norm are exactly these two blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["find_head", "weight_norms", "activation_norms", "resolve_layers"]


def find_head(model: nn.Module, inputs: Tensor, output_fn=None) -> str:
    """Name of the final ``nn.Linear``: the last one called whose output is the logits.

    Runs one forward on the first example. Raises ``ValueError`` if no linear layer runs or if
    the last one called cannot be the head (pass ``head=...`` explicitly then).

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> find_head(net, torch.randn(2, 4))
    '2'
    """
    from .jacobian import model_logits

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    order: list[str] = []
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: order.append(n))
               for n, m in linears.items()]
    try:
        with torch.no_grad():
            logits = model_logits(model, inputs[:1], output_fn)
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError(
            "no linear head found: no nn.Linear ran in the forward pass. The diagnostics need a "
            "final linear layer z = V a + b; pass head='<module name>' naming it"
        )
    name = order[-1]
    n_out = 1 if logits.dim() == 1 else logits.shape[1]
    if linears[name].out_features != n_out or order.count(name) > 1:
        raise ValueError(
            f"cannot identify the final linear layer: the last nn.Linear called, {name!r}, "
            f"has {linears[name].out_features} outputs (called {order.count(name)}x) but the "
            f"model returns {n_out} logits; pass head='<module name>' explicitly"
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


def activation_norms(acts: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    """Per-example L2 norm of each watched module's input (all calls concatenated), ``[B]``."""
    out = {}
    for name, calls in acts.items():
        if not calls:
            raise ValueError(f"watched layer {name!r} did not run in the forward pass")
        flat = torch.cat([c.reshape(c.shape[0], -1) for c in calls], dim=1)
        out[name] = flat.norm(dim=1)
    return out


def weight_norms(model: nn.Module) -> dict[str, Tensor]:
    """Frobenius norm of the ``weight`` of every module that has one, ``{module name: scalar}``."""
    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            w = getattr(module, "weight", None)
            if isinstance(w, nn.Parameter):
                out[name] = w.detach().norm()
    return out


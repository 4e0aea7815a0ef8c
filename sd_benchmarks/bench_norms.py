"""Per-example Jacobian norms (C = 10) and per-example gradient norms: the library's fast and
exact (torch.func) paths, a naive per-example autograd loop, Hutchinson, BackPACK and Opacus."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import sam_diagnostics as sd

from .models import Config
from .timing import Case

__all__ = ["fwd_bwd", "jacobian_cases", "grad_cases", "naive_jacobian_norms",
           "naive_grad_norms"]

# Per-example batch sizes for the slow references (time extrapolated linearly to the full batch).
NAIVE_SUB = {"mlp": 16, "cnn": 8, "transformer": 8}
QUICK_SUB = 2
# Batch for the exact (torch.func) Jacobian where the full batch would take too long.
EXACT_JAC_SUB = {"mlp": 64, "cnn": 64}


def fwd_bwd(model: nn.Module, x, y):
    """One plain forward + backward of the mean cross-entropy (the baseline)."""

    def run():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    return run


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def naive_jacobian_norms(model: nn.Module, x) -> torch.Tensor:
    """``‖J_i‖_F``: per example one forward and C backward passes (autograd, no tricks)."""
    params = _params(model)
    out = []
    for i in range(x.shape[0]):
        z = model(x[i:i + 1])[0]
        s = 0.0
        for c in range(z.shape[0]):
            g = torch.autograd.grad(z[c], params, retain_graph=c < z.shape[0] - 1)
            s = s + sum(v.pow(2).sum() for v in g)
        out.append(s)
    return torch.stack(out).sqrt()


def naive_grad_norms(model: nn.Module, x, y) -> torch.Tensor:
    """``‖∇ℓ_i‖``: per example one forward and one backward."""
    params = _params(model)
    out = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        out.append(sum(v.pow(2).sum() for v in torch.autograd.grad(loss, params)))
    return torch.stack(out).sqrt()


def _sub(cfg: Config, B: int, quick: bool, table: dict) -> int:
    """The sub-batch a slow reference is timed on (the full batch ``B`` if not in ``table``)."""
    return min(B, QUICK_SUB if quick else table.get(cfg.name, B))


def jacobian_cases(cfg: Config, model: nn.Module, x, y, quick: bool = False) -> list[Case]:
    B = x.shape[0]
    n = _sub(cfg, B, quick, NAIVE_SUB)
    ne = _sub(cfg, B, quick, EXACT_JAC_SUB)
    gen = torch.Generator().manual_seed(0)
    # issue 10: MLP ≤ 4×, CNN and transformer ≤ 6×, ≥ 1.5× faster than torch.func and the loop
    fast_targets = [("ratio", {"mlp": 4.0, "cnn": 6.0, "transformer": 6.0}[cfg.name]),
                    ("speedup", "exact (torch.func vmap)", 1.5),
                    ("speedup", "naive loop (autograd per example × class)", 1.5)]
    return [
        Case("fwd+bwd", lambda: fwd_bwd(model, x, y), baseline=True),
        Case("fast", lambda: lambda: sd.jacobian_norms(model, x, method="fast"),
             targets=fast_targets),
        Case("exact (torch.func vmap)",
             lambda: lambda: sd.jacobian_norms(model, x[:ne], method="exact"),
             scale=B / ne, note=f"timed at batch {ne}, ×{B // ne}" if ne < B else ""),
        Case("naive loop (autograd per example × class)",
             lambda: lambda: naive_jacobian_norms(model, x[:n]), scale=B / n,
             note=f"timed on {n} examples, ×{B / n:g}"),
        Case("hutchinson (1 probe)",
             lambda: lambda: sd.jacobian_norms(model, x, method="hutchinson", num_probes=1,
                                               generator=gen),
             note="estimate, not exact"),
    ]


def _backpack(model, x, y):
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    net = extend(copy.deepcopy(model))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))

    def run():
        net.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        with backpack(BatchL2Grad()):
            loss.backward()
        missing = sorted({type(m).__name__ for m in net.modules()
                          for p in m.parameters(recurse=False) if not hasattr(p, "batch_l2")})
        if missing:
            raise NotImplementedError("not supported: BackPACK has no BatchL2Grad rule for "
                                      + ", ".join(missing))
        return sum(p.batch_l2 for p in net.parameters()).sqrt()

    return run


def _opacus(model, x, y):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    # Opacus records activations only in train mode (the models have no dropout/BatchNorm)
    net = GradSampleModuleFastGradientClipping(copy.deepcopy(model).train(), max_grad_norm=1.0,
                                               use_ghost_clipping=True, loss_reduction="sum")

    def run():
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y, reduction="sum").backward()
        return net.get_norm_sample()

    return run


def grad_cases(cfg: Config, model: nn.Module, x, y, quick: bool = False) -> list[Case]:
    B = x.shape[0]
    n = _sub(cfg, B, quick, NAIVE_SUB)
    # issue 10: MLP ≤ 1.0×, CNN ≤ 1.6×, ahead of BackPACK and Opacus where they run
    fast_targets = [("speedup", "exact (torch.func vmap)", 1.5),
                    ("speedup", "naive loop (autograd per example)", 1.5),
                    ("faster", "BackPACK BatchL2Grad"), ("faster", "Opacus ghost clipping")]
    if cfg.name in ("mlp", "cnn"):
        fast_targets = [("ratio", 1.0 if cfg.name == "mlp" else 1.6)] + fast_targets
    return [
        Case("fwd+bwd", lambda: fwd_bwd(model, x, y), baseline=True),
        Case("fast", lambda: lambda: sd.grad_norms(model, x, y, method="fast"),
             targets=fast_targets),
        Case("exact (torch.func vmap)", lambda: lambda: sd.grad_norms(model, x, y,
                                                                      method="exact")),
        Case("naive loop (autograd per example)",
             lambda: lambda: naive_grad_norms(model, x[:n], y[:n]), scale=B / n,
             note=f"timed on {n} examples, ×{B / n:g}"),
        Case("BackPACK BatchL2Grad", lambda: _backpack(model, x, y)),
        Case("Opacus ghost clipping", lambda: _opacus(model, x, y),
             note="norm pass only (first backward)"),
    ]

"""Naive per-example references: a Python loop over single examples, autograd on each."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


def loss_one(logits, y):
    if logits.dim() == 1 or logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits.reshape(-1), y.reshape(-1).double())[()]
    return F.cross_entropy(logits, y)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def grad_one(model, x, y):
    """∇ℓ_i for one example, as a flat list per trainable parameter (unique parameters)."""
    loss = loss_one(model(x[None]), y[None])
    return torch.autograd.grad(loss, trainable(model), allow_unused=True, materialize_grads=True)


def jac_sq_one(model, x):
    z = model(x[None]).reshape(-1)
    ps = trainable(model)
    s = 0.0
    for c in range(z.shape[0]):
        g = torch.autograd.grad(z[c], ps, retain_graph=True, allow_unused=True,
                                materialize_grads=True)
        s = s + sum(v.pow(2).sum() for v in g)
    return s


def perturbed_copy(model, eps_list):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, e in zip(trainable(m), eps_list):
            p.add_(e)
    return m


def eps_one(model, x, y, rho):
    g = grad_one(model, x, y)
    norm = torch.sqrt(sum(v.pow(2).sum() for v in g))
    return [rho * v / norm if norm > 0 else torch.zeros_like(v) for v in g]


def quantities_one(model, x, y, act_module):
    """loss, logits, jacobian norm, grad norm and head-input norm of one example."""
    store = []
    h = act_module.register_forward_hook(lambda mod, a, o: store.append(a[0]))
    try:
        z = model(x[None])
    finally:
        h.remove()
    loss = loss_one(z, y[None])
    g = torch.autograd.grad(loss, trainable(model), allow_unused=True, materialize_grads=True)
    return {
        "logits": z[0].detach(),
        "loss": loss.detach(),
        "jacobian_norm": jac_sq_one(model, x).sqrt().detach(),
        "grad_norm": torch.sqrt(sum(v.pow(2).sum() for v in g)).detach(),
        "activation_norm": store[0].reshape(-1).norm().detach(),
    }

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


# ------------------------------------------------------------------ zoo reference (issue 9)
#
# Written from SPEC 2.1-2.3 only; never imports sam_diagnostics. ``build()`` returns a FRESH
# float64 model in eval mode, identical to the one under test (deterministic factory): the
# reference never touches the tested model (deepcopy is not possible with legacy weight_norm,
# and Embedding(max_norm) writes to its weight during forward).


def logit_terms_one(z, t, binary):
    """loss, margin, logit scale and δ = ∂ℓ/∂z of ONE example's logits ``z`` ([C] or [1])."""
    if binary:
        f = z.reshape(())
        s = 2.0 * float(t) - 1.0
        return (F.softplus(-s * f), s * f, torch.sigmoid(-s * f),
                (-s * torch.sigmoid(-s * f)).reshape(1))
    t = int(t)
    loss = torch.logsumexp(z, 0) - z[t]
    others = torch.cat([z[:t], z[t + 1:]])
    delta = torch.softmax(z, 0) - F.one_hot(torch.tensor(t), z.numel()).to(z.dtype)
    return loss, z[t] - others.max(), delta.norm(), delta


def named_trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _inputs_norms(model, xi):
    """Forward one example; per module, the norm of all its first inputs (several calls: all)."""
    acts = {}

    def hook(mod, inp, name):
        if inp and isinstance(inp[0], torch.Tensor) and inp[0].is_floating_point():
            acts.setdefault(name, []).append(inp[0].detach().reshape(-1))

    handles = [m.register_forward_pre_hook(lambda mod, inp, name=name: hook(mod, inp, name))
               for name, m in model.named_modules()]
    try:
        z = model(xi[None]).reshape(-1)
    finally:
        for h in handles:
            h.remove()
    return z, {k: torch.cat(v).norm() for k, v in acts.items()}


def zoo_single(model, xi, t, binary):
    """Every per-example quantity of one example at the model's current parameters."""
    z, acts = _inputs_norms(model, xi)
    names, params = zip(*named_trainable(model))
    loss, margin, scale, delta = logit_terms_one(z, t, binary)
    jac = [torch.zeros_like(p) for p in params]
    jac_sq = 0.0
    for c in range(z.numel()):
        gs = torch.autograd.grad(z[c], params, retain_graph=True, allow_unused=True,
                                 materialize_grads=True)
        jac_sq = jac_sq + sum(g.pow(2).sum() for g in gs)
        for k, g in enumerate(gs):
            jac[k] = jac[k] + delta[c].detach() * g  # J^T δ, accumulated per logit
    grad = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    for n, g, jtd in zip(names, grad, jac):  # self-check of the reference: ∇ℓ = J^T δ
        assert torch.allclose(g, jtd, rtol=1e-9, atol=1e-12), n
    return {
        "loss": loss.detach(), "margin": margin.detach(), "logit_scale": scale.detach(),
        "delta": delta.detach(), "z": z.detach(), "jacobian_norm": jac_sq.sqrt().detach(),
        "grad": {n: g.detach() for n, g in zip(names, grad)},
        "grad_norm": torch.sqrt(sum(g.pow(2).sum() for g in grad)).detach(),
        "act": acts,
    }


def zoo_groups(batch, m):
    m = batch if m is None else m
    return [list(range(s, min(s + m, batch))) for s in range(0, batch, m)]


def _shifted(build, eps):
    model = build()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in eps:
                p.add_(eps[n])
    return model


def zoo_reference(build, x, y, binary, rho, ms=(1, 3, None)):
    """Per-example quantities at w and at w + ε (per group, for each m) and the SAM updates.

    Returns ``{"w": [per example], "sam_view": {m: [per example]}, "updates": {(m, variant):
    {param name: (1/B) Σ_i g_i}}, "weight_norm": {module name: ‖weight‖_F}}``.
    """
    model = build()
    B = x.shape[0]
    names, params = zip(*named_trainable(model))
    at_w = [zoo_single(model, x[i], y[i], binary) for i in range(B)]
    weight_norm = {n: mod.weight.detach().norm() for n, mod in model.named_modules()
                   if isinstance(getattr(mod, "weight", None), torch.Tensor)}
    out = {"w": at_w, "sam_view": {}, "updates": {}, "weight_norm": weight_norm}
    for m in ms:
        view = [None] * B
        upd = {v: {n: torch.zeros_like(p) for n, p in zip(names, params)}
               for v in ("sgd", "sam", "lsam", "jsam")}
        for idx in zoo_groups(B, m):
            total = 0.0
            for i in idx:  # ε_g from the group's mean loss, one example per forward
                total = total + logit_terms_one(model(x[i:i + 1]).reshape(-1), y[i], binary)[0]
            gs = torch.autograd.grad(total / len(idx), params, allow_unused=True,
                                     materialize_grads=True)
            norm = torch.sqrt(sum(g.pow(2).sum() for g in gs))
            eps = {n: rho * g / norm for n, g in zip(names, gs)}
            moved = _shifted(build, eps)
            mp = dict(moved.named_parameters())
            for i in idx:
                view[i] = zoo_single(moved, x[i], y[i], binary)
                for n in names:
                    upd["sgd"][n] += at_w[i]["grad"][n] / B
                    upd["sam"][n] += view[i]["grad"][n] / B
                # L-SAM: VJP at w with the detached cotangent δ_i(w + ε)
                z = model(x[i:i + 1]).reshape(-1)
                g = torch.autograd.grad(z, params, grad_outputs=view[i]["delta"],
                                        allow_unused=True, materialize_grads=True)
                for n, gn in zip(names, g):
                    upd["lsam"][n] += gn / B
                # J-SAM: VJP at w + ε with the detached cotangent δ_i(w)
                z = moved(x[i:i + 1]).reshape(-1)
                g = torch.autograd.grad(z, [mp[n] for n in names], grad_outputs=at_w[i]["delta"],
                                        allow_unused=True, materialize_grads=True)
                for n, gn in zip(names, g):
                    upd["jsam"][n] += gn / B
        out["sam_view"][m] = view
        for v, u in upd.items():
            out["updates"][(m, v)] = u
    return out

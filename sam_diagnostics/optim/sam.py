"""The SAM family (SPEC 2.1-2.2): SAM, m-sharpness / 1-SAM, L-SAM and J-SAM, as one optimizer.

For every group ``g`` of ``m`` examples, ``ε_g = ρ ∇L_g(w) / ‖∇L_g(w)‖`` (``m = 1``: per-example
``ε_i``, the paper's 1-SAM; ``m = None``: one ε for the batch). With that ε, example ``i`` gives

    SAM   : g_i = J_i(w+ε)ᵀ δ_i(w+ε)      (both factors perturbed)
    L-SAM : g_i = J_i(w)ᵀ   δ_i(w+ε)      (only the logit term)
    J-SAM : g_i = J_i(w+ε)ᵀ δ_i(w)        (only the Jacobian)

and the base optimizer steps with ``(1/B) Σ_i g_i``. The weights are never moved: perturbed
passes run at ``w + ε`` through hooks (m = 1) or ``torch.func.functional_call`` (groups), so
``w`` is exactly as before when the base optimizer steps. BatchNorm running statistics are not
updated by the perturbed pass.

Examples
--------
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> opt = SAM(net, torch.optim.SGD(net.parameters(), lr=0.1), rho=0.05, m=1, variant="jsam")
>>> loss = opt.step(torch.randn(16, 4), torch.randint(0, 3, (16,)))
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap

from ..hooks import Capture, check_per_example, make_plan, traced
from ..jacobian import check_inputs, check_loss, model_logits
from ..logit_terms import check_head, per_example_loss
from ..perturb import _normalize, check_rho_m, group_slices, per_example_offsets
from ..rules import NotFastError

__all__ = ["SAM", "VARIANTS"]

VARIANTS = ("sam", "lsam", "jsam")


@contextlib.contextmanager
def frozen_buffers(model: nn.Module):
    """Restore every buffer (e.g. BatchNorm running statistics) bit-exactly on exit."""
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])


def _logit_grad(loss_fn, logits: Tensor, targets: Tensor) -> Tensor:
    """``δ_i = ∂ℓ_i/∂z_i`` as a constant (per example, unscaled)."""
    with torch.enable_grad():
        z = logits.detach().requires_grad_(True)
        (d,) = torch.autograd.grad(loss_fn(z, targets).sum(), z)
    return d


class SAM:
    """Sharpness-aware minimization and its L-SAM / J-SAM ablations around any base optimizer.

    Parameters
    ----------
    model : nn.Module
    base_optimizer : torch.optim.Optimizer
        Constructed over the model's parameters (SGD with momentum and weight decay, AdamW...);
        SAM only supplies its gradient, so its state and LR schedulers work unchanged.
    rho : float
        Perturbation radius ``ρ`` (in raw parameter space; ``ρ = 0`` is the base optimizer).
    m : int or None
        Examples per perturbation group: ``1`` is 1-SAM (per-example ε), ``None`` is batch SAM.
        Groups are consecutive; if ``m`` does not divide the batch the last group is smaller.
    variant : {"sam", "lsam", "jsam"}
    adaptive : bool
        ASAM: ``ε = ρ T² ∇L / ‖T ∇L‖`` with ``T = |w|`` element-wise.
    loss_fn : callable, optional
        ``loss_fn(logits, targets) -> [B]`` per-example losses (default: cross-entropy, or the
        logistic loss for a single-logit head).
    output_fn : callable, optional
        Picks the logits from the model's output.
    method : {"auto", "fast", "exact"}
        For ``m = 1``: ``"fast"`` uses the per-layer outer-product identity (no per-example
        parameter copies), ``"exact"`` the torch.func vmap over per-example parameters, ``"auto"``
        the fast path wherever it is exact (no tied weights, not adaptive).

    Notes
    -----
    With ``m`` smaller than the batch, BatchNorm in train mode would make each example's
    gradient depend on the others: that raises ``ValueError`` (use GroupNorm/LayerNorm, as the
    SAM label-noise paper did, or put BatchNorm in eval mode).
    """

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, rho: float = 0.05,
                 m: int | None = None, variant: str = "sam", adaptive: bool = False, *,
                 loss_fn=None, output_fn=None, method: str = "auto"):
        check_rho_m(rho, m)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if method not in ("auto", "fast", "exact"):
            raise ValueError(f"method must be 'auto', 'fast' or 'exact', got {method!r}")
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                "base_optimizer must be a constructed torch.optim.Optimizer, e.g. "
                "torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)"
            )
        own = {id(p) for p in model.parameters()}
        if any(id(p) not in own for g in base_optimizer.param_groups for p in g["params"]):
            raise ValueError("base_optimizer holds parameters that are not the model's")
        self.model, self.base_optimizer = model, base_optimizer
        self.rho, self.m, self.variant, self.adaptive = float(rho), m, variant, adaptive
        self.loss_fn = loss_fn or per_example_loss
        self.output_fn, self.method = output_fn, method
        self._saved: dict[nn.Parameter, Tensor] = {}

    # ----------------------------------------------------------- torch.optim-like surface
    @property
    def param_groups(self):
        return self.base_optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state) -> None:
        self.base_optimizer.load_state_dict(state)

    def __repr__(self) -> str:
        return (f"SAM(variant={self.variant!r}, rho={self.rho}, m={self.m}, "
                f"adaptive={self.adaptive}, base={type(self.base_optimizer).__name__})")

    # ----------------------------------------------------------- the full update
    def _params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """One update: gradient of the chosen variant, then the base optimizer's step.

        Returns the batch's mean loss at ``w`` (detached).
        """
        check_inputs(inputs)
        if not isinstance(targets, Tensor) or targets.shape[:1] != inputs.shape[:1]:
            raise ValueError(
                f"targets must be a tensor of shape [B] = [{inputs.shape[0]}] matching inputs, "
                f"got {getattr(targets, 'shape', type(targets))}"
            )
        if self.m is not None and self.m < inputs.shape[0]:
            check_per_example(self.model)
        grads, loss = self.gradient(inputs, targets)
        params = self._params()
        for n, p in params.items():
            p.grad = grads[n].to(p.dtype)
        self.base_optimizer.step()
        return loss

    def gradient(self, inputs: Tensor, targets: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The variant's mean gradient ``(1/B) Σ_i g_i`` per parameter and the mean loss at w."""
        if self.m == 1 and self.method != "exact" and not self.adaptive:
            try:
                return self._fast_gradient(inputs, targets)
            except NotFastError as err:
                if self.method == "fast":
                    raise ValueError(f"method='fast' cannot be exact here: {err}") from err
        if self.m == 1:
            return self._func_gradient(inputs, targets)
        return self._group_gradient(inputs, targets)

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.loss_fn is per_example_loss:
            check_head(logits.detach(), targets)
        loss = self.loss_fn(logits, targets)
        check_loss(loss, logits)
        return loss

    def _fast_gradient(self, x: Tensor, y: Tensor):
        """m = 1 through the per-layer rules: ``W a' + c_i δ_i (a_i · a')`` for Linear layers."""
        model, params = self.model, self._params()
        plan = make_plan(model)
        if plan.problem:
            raise NotFastError(plan.problem)
        with torch.enable_grad():
            xt = traced(x)
            with Capture(plan, inputs=xt) as cap:
                logits = model_logits(model, xt, self.output_fn)
            cap.check_all_fired(logits)
            loss = self._loss(logits, y)
            delta_w = _logit_grad(self.loss_fn, logits, y)
            _, offsets = per_example_offsets(cap, cap.cotangents(logits, delta_w[None]), self.rho)
            with frozen_buffers(model):
                if self.variant == "lsam":
                    with torch.no_grad(), Capture(plan, offsets, record=False):
                        logits_p = model_logits(model, x, self.output_fn)
                    out, cot = logits, _logit_grad(self.loss_fn, logits_p, y)
                else:
                    with Capture(plan, offsets, record=False):
                        out = model_logits(model, x, self.output_fn)
                    cot = (_logit_grad(self.loss_fn, out, y) if self.variant == "sam"
                           else delta_w)
                g = torch.autograd.grad(out, list(params.values()), grad_outputs=cot,
                                        allow_unused=True, materialize_grads=True)
        B = x.shape[0]
        return {n: v / B for n, v in zip(params, g)}, loss.detach().mean()

    def _func_gradient(self, x: Tensor, y: Tensor):
        """m = 1 with torch.func: vmap over per-example parameters ``w + ε_i`` (O(B × P))."""
        model = self.model
        params = {n: p.detach() for n, p in self._params().items()}
        const = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        const.update(dict(model.named_buffers()))
        with torch.no_grad():
            loss = self._loss(model_logits(model, x, self.output_fn), y)
        core = getattr(self.loss_fn, "unchecked", self.loss_fn)
        output_fn = self.output_fn

        def f(p, xi):
            out = functional_call(model, {**const, **p}, (xi[None],))
            return output_fn(out) if output_fn is not None else out

        def loss_i(p, xi, yi):
            return core(f(p, xi), yi[None])[0]

        def dz(z, yi):
            return grad(lambda q: core(q, yi[None])[0])(z.detach())

        def per_example(xi, yi):
            g = grad(loss_i)(params, xi, yi)
            eps = _normalize(g, self.rho, params, self.adaptive, lead=0)
            pe = {n: params[n] + eps[n] for n in params}
            if self.variant == "sam":
                return grad(loss_i)(pe, xi, yi)
            if self.variant == "jsam":
                cot = dz(f(params, xi), yi)
                _, pull = vjp(lambda p: f({n: p[n] + eps[n] for n in p}, xi), params)
            else:
                cot = dz(f(pe, xi), yi)
                _, pull = vjp(lambda p: f(p, xi), params)
            return pull(cot)[0]

        chunk = max(1, 2**25 // max(1, sum(p.numel() for p in params.values())))
        with frozen_buffers(model):
            g = vmap(per_example, randomness="different", chunk_size=chunk)(x, y)
        return {n: v.mean(0) for n, v in g.items()}, loss.detach().mean()

    def _group_gradient(self, x: Tensor, y: Tensor):
        """Groups of m examples (m = None: the batch): one ε per group, perturbed passes through
        ``functional_call`` at ``w + ε_g`` (the module's own weights are never written)."""
        model, params = self.model, self._params()
        names = list(params)
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        losses = []
        for s in group_slices(x.shape[0], self.m):
            xg, yg = x[s], y[s]
            with torch.enable_grad():
                logits = model_logits(model, xg, self.output_fn)
                loss = self._loss(logits, yg)
                losses.append(loss.detach())
                g = torch.autograd.grad(loss.mean(), list(params.values()),
                                        retain_graph=self.variant == "lsam", allow_unused=True,
                                        materialize_grads=True)
                p_det = {n: p.detach() for n, p in params.items()}
                eps = _normalize(dict(zip(names, g)), self.rho, p_det, self.adaptive, lead=0)
                pert = {n: params[n] + eps[n].detach() for n in names}
                with frozen_buffers(model):
                    if self.variant == "lsam":
                        with torch.no_grad():
                            z_p = self._call(pert, xg)
                        out, cot = logits, _logit_grad(self.loss_fn, z_p, yg)
                    else:
                        out = self._call(pert, xg)
                        cot = (_logit_grad(self.loss_fn, out, yg) if self.variant == "sam"
                               else _logit_grad(self.loss_fn, logits, yg))
                    gg = torch.autograd.grad(out, list(params.values()), grad_outputs=cot,
                                             allow_unused=True, materialize_grads=True)
            for n, v in zip(names, gg):
                total[n] += v
        B = x.shape[0]
        return {n: v / B for n, v in total.items()}, torch.cat(losses).mean()

    def _call(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        out = functional_call(self.model, params, (x,), strict=False)
        out = self.output_fn(out) if self.output_fn is not None else out
        return out

    # ----------------------------------------------------------- the two-call form
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to ``w + ε`` using the gradients already in ``p.grad`` (batch SAM, two-call API
        as in the widely used davda54/sam: ``loss.backward(); opt.first_step(zero_grad=True);
        loss_fn(model(x), y).backward(); opt.second_step()``)."""
        params = {n: p for n, p in self._params().items() if p.grad is not None}
        if not params:
            raise RuntimeError("first_step needs gradients: call loss.backward() first")
        eps = _normalize({n: p.grad for n, p in params.items()}, self.rho,
                         {n: p.detach() for n, p in params.items()}, self.adaptive, lead=0)
        self._saved = {p: p.detach().clone() for p in params.values()}
        for n, p in params.items():
            p.add_(eps[n])
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` bit-exactly and step the base optimizer with the gradient at ``w + ε``."""
        if not self._saved:
            raise RuntimeError("second_step called without first_step")
        for p, w in self._saved.items():
            p.copy_(w)
        self._saved = {}
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

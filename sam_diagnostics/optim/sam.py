"""The SAM family (SPEC 2.1-2.2): SAM, m-sharpness / 1-SAM, L-SAM and J-SAM, as one optimizer.

For every group ``g`` of ``m`` examples, ``ε_g = ρ ∇L_g(w) / ‖∇L_g(w)‖`` (``m = 1``: per-example
``ε_i``, the paper's 1-SAM; ``m = None``: one ε for the batch). With that ε, example ``i`` gives

    SAM   : g_i = J_i(w+ε)ᵀ δ_i(w+ε)      (both factors perturbed)
    L-SAM : g_i = J_i(w)ᵀ   δ_i(w+ε)      (only the logit term)
    J-SAM : g_i = J_i(w+ε)ᵀ δ_i(w)        (only the Jacobian)

and the base optimizer steps with ``(1/B) Σ_i g_i``. Every pass goes through the engine
(:mod:`sam_diagnostics.engine`): with ``m = 1`` each example is evaluated at its own ``w + ε_i``
through the factored offsets (per-layer rules where proven exact, torch.func otherwise); groups
are evaluated at ``w + ε_g`` in place and ``w`` is restored bit-exactly before the base
optimizer steps. BatchNorm running statistics are not updated by the perturbed pass.

Examples
--------
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> opt = SAM(net, torch.optim.SGD(net.parameters(), lr=0.1), rho=0.05, m=1, variant="jsam")
>>> loss = opt.step(torch.randn(16, 4), torch.randint(0, 3, (16,)))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..engine import Engine, check_inputs, check_loss, check_targets, logit_grad
from ..hooks import (
    check_per_example,
    frozen_buffers,
    kept_attributes,
    unfused_attention,
    unwrap,
)
from ..logit_terms import check_head, per_example_loss
from ..perturb import check_rho_m, epsilon, group_slices, perturbed
from ..plan import exact_plan

__all__ = ["SAM", "VARIANTS"]

VARIANTS = ("sam", "lsam", "jsam")


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
        the fast path wherever it is proven exact for the model.
    sync_epsilon : {"replica", "global"}
        Under ``DistributedDataParallel`` with ``m=None``: ``"replica"`` (default, as the
        original SAM implementation) gives every rank its own ε from its shard — m-sharpness
        with ``m`` = the local batch; ``"global"`` all-reduces the first gradient so all ranks
        share the ε of the global batch. Per-example (``m = 1``) and group ε are local by
        definition and unaffected.

    Notes
    -----
    Under ``DistributedDataParallel`` (wrap the model as usual and pass the wrapper) every
    per-example pass runs on the wrapped module without gradient synchronisation (the
    ``no_sync`` of the first pass), and only the final update ``(1/B) Σ_i g_i`` is all-reduced
    (averaged over ranks), once per step. The returned loss is the local shard's mean.

    With ``m`` smaller than the batch, BatchNorm in train mode would make each example's
    gradient depend on the others: that raises ``ValueError`` (use GroupNorm/LayerNorm, as the
    SAM label-noise paper did, or put BatchNorm in eval mode).
    """

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, rho: float = 0.05,
                 m: int | None = None, variant: str = "sam", adaptive: bool = False, *,
                 loss_fn=None, output_fn=None, method: str = "auto",
                 sync_epsilon: str = "replica"):
        check_rho_m(rho, m)
        if sync_epsilon not in ("replica", "global"):
            raise ValueError(f"sync_epsilon must be 'replica' or 'global', got {sync_epsilon!r}")
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
        self.ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        model = unwrap(model)
        self.model, self.base_optimizer = model, base_optimizer
        self.sync_epsilon = sync_epsilon
        self.rho, self.m, self.variant, self.adaptive = float(rho), m, variant, adaptive
        self.loss_fn = loss_fn or per_example_loss
        self.output_fn, self.method = output_fn, method
        self.engine = Engine(model, output_fn=output_fn, method=method, loss_fn=self.loss_fn)
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
        if self._saved:
            raise RuntimeError("step() called between first_step() and second_step(); finish "
                               "the two-call update with second_step() first")
        check_inputs(inputs, self.model)
        check_targets(targets, inputs)
        if self.m is not None and self.m < inputs.shape[0]:
            check_per_example(self.model)
        grads, loss = self.gradient(inputs, targets)
        if self.ddp is not None:
            grads = self._all_mean(grads)
        for n, p in self._params().items():
            p.grad = grads[n].to(p.dtype)
        self.base_optimizer.step()
        return loss

    def gradient(self, inputs: Tensor, targets: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The variant's mean gradient ``(1/B) Σ_i g_i`` per parameter and the mean loss at w."""
        with kept_attributes(self.model), unfused_attention():
            if self.m != 1 and inputs.shape[0] > 1:
                return self._groups(inputs, targets)
            w = 1.0 / inputs.shape[0]
            parts = self.engine.per_chunk(  # the update is a mean: exact in chunks
                inputs, lambda plan, s: self._per_example(plan, inputs[s], targets[s], w))
        grads, loss = parts[0]
        for g, l in parts[1:]:
            grads = {n: v + g[n] for n, v in grads.items()}
            loss = loss + l
        return grads, loss

    def _all_mean(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """The mean over ranks of a gradient dict (one flat all-reduce)."""
        import torch.distributed as dist

        names = list(grads)
        flat = torch.cat([grads[n].reshape(-1) for n in names])
        dist.all_reduce(flat, group=self.ddp.process_group)
        flat /= dist.get_world_size(self.ddp.process_group)
        out, i = {}, 0
        for n in names:
            k = grads[n].numel()
            out[n] = flat[i:i + k].view_as(grads[n])
            i += k
        return out

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.loss_fn is per_example_loss:
            check_head(logits.detach(), targets)
        loss = self.loss_fn(logits, targets)
        check_loss(loss, logits)
        return loss

    def _cotangent(self, at_w, delta_w: Tensor, at_eps, y: Tensor) -> Tensor:
        return logit_grad(self.loss_fn, at_eps.logits, y) if self.variant != "jsam" else delta_w

    def _per_example(self, plan, x: Tensor, y: Tensor, w: float):
        """m = 1: every example at its own ``w + ε_i`` through the engine's offsets (for Linear
        layers ``W a' + c_i δ_i (a_i · a')``; torch.func where no rule is exact). Returns
        ``w Σ_i g_i`` (the cotangent carries the weight ``w = 1/B``) and ``w Σ_i ℓ_i``."""
        engine = self.engine
        with torch.enable_grad():
            at_w = engine.run(plan, x)
            loss = self._loss(at_w.logits, y)
            delta = logit_grad(self.loss_fn, at_w.logits, y)
            if self.adaptive:
                _, off = at_w.adaptive_offsets(delta, self.rho, engine.params())
            else:
                _, off = at_w.offsets(delta, self.rho)
            with frozen_buffers(self.model):
                if self.variant == "lsam":  # J(w)ᵀ δ(w + ε): the pass at w + ε needs no graph
                    at_eps = engine.run(plan, x, offsets=off, graph=False)
                    g = at_w.grad(self._cotangent(at_w, delta, at_eps, y) * w)
                else:
                    at_eps = engine.run(plan, x, offsets=off)
                    g = at_eps.grad(self._cotangent(at_w, delta, at_eps, y) * w)
        return g, loss.detach().sum() * w

    def _groups(self, x: Tensor, y: Tensor):
        """Groups of m examples (m = None: the batch): one ε per group, the model evaluated at
        ``w + ε_g`` in place (:func:`~sam_diagnostics.perturb.perturbed`, restored exactly)."""
        engine, plan = self.engine, exact_plan(self.model, self.output_fn)
        params = engine.params()
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        losses = []
        with torch.enable_grad():
            for s in group_slices(x.shape[0], self.m):
                xg, yg = x[s], y[s]
                at_w = engine.run(plan, xg)
                loss = self._loss(at_w.logits, yg)
                losses.append(loss.detach())
                delta = logit_grad(self.loss_fn, at_w.logits, yg)
                g_w = at_w.grad(delta / (s.stop - s.start))
                if self.m is None and self.ddp is not None and self.sync_epsilon == "global":
                    g_w = self._all_mean(g_w)  # the global batch's ε
                eps = epsilon(g_w, self.rho, params, self.adaptive)
                with frozen_buffers(self.model):
                    with perturbed(self.model, eps):
                        at_eps = engine.run(plan, xg, graph=self.variant != "lsam")
                        if self.variant != "lsam":
                            g = at_eps.grad(self._cotangent(at_w, delta, at_eps, yg))
                    if self.variant == "lsam":  # a fresh graph at w (the weights moved twice)
                        g = engine.run(plan, xg).grad(
                            self._cotangent(at_w, delta, at_eps, yg))
                for n, v in g.items():
                    total[n] += v
        B = x.shape[0]
        return {n: v / B for n, v in total.items()}, torch.cat(losses).mean()

    # ----------------------------------------------------------- the two-call form
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to ``w + ε`` using the gradients already in ``p.grad`` (batch SAM, two-call API
        as in the widely used davda54/sam: ``loss.backward(); opt.first_step(zero_grad=True);
        loss_fn(model(x), y).backward(); opt.second_step()``).

        Only batch SAM (``m=None``, ``variant="sam"``) can be computed from ``.grad``; the
        others need ``opt.step(inputs, targets)``.
        """
        if self.m is not None or self.variant != "sam":
            raise ValueError(
                f"the two-call API computes one ε from the batch gradient in .grad, i.e. batch "
                f"SAM; SAM(m={self.m}, variant={self.variant!r}) needs opt.step(inputs, "
                "targets), or construct SAM(..., m=None, variant='sam') for the two-call form")
        if self._saved:
            raise RuntimeError("first_step() called twice: the weights are already at w + ε; "
                               "call second_step() to restore w and step")
        params = {n: p for n, p in self._params().items() if p.grad is not None}
        if not params:
            raise RuntimeError("first_step needs gradients: call loss.backward() first")
        eps = epsilon({n: p.grad for n, p in params.items()}, self.rho,
                      {n: p.detach() for n, p in params.items()}, self.adaptive)
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

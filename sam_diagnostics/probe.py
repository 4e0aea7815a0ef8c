"""`Probe`: every per-example quantity of SPEC 2.3, at ``w`` (the SGD view) and at ``w + ε_i``
(the SAM view), as one ``xarray.Dataset``.

Per view the fast path costs one forward and ``C + 1`` input-gradient backward passes: the ``C``
one-hot directions give the Jacobian norm, the logit term gives the gradient norm and, at ``w``,
also the per-example perturbations of the SAM view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn
from torch.func import functional_call, vmap

from . import __version__
from .hooks import Capture, capture_inputs, make_plan, measuring, traced
from .jacobian import (
    check_inputs,
    exact_block_sq_norms,
    loss_directions,
    model_logits,
    one_hot_directions,
)
from .logit_terms import check_head, logit_scale, margin, per_example_loss
from .norms import activation_norms, find_head, resolve_layers, weight_norms
from .perturb import check_rho_m, group_slices, per_example_offsets, perturbed, sam_epsilon
from .rules import NotFastError

__all__ = ["Probe", "VIEWS"]

VIEWS = ("sgd", "sam")


@dataclass
class _View:
    logits: Tensor
    jac_sq: dict[str, Tensor]
    grad_sq: dict[str, Tensor]
    acts: dict[str, Tensor]
    offsets: dict | None = None


def _total(sq: dict[str, Tensor], like: Tensor) -> Tensor:
    return (sum(sq.values()) if sq else torch.zeros_like(like[:, 0] if like.dim() == 2 else like))


class Probe:
    """Measure per-example diagnostics of ``model`` at ``w`` and at ``w + ε_i``.

    Parameters
    ----------
    model : nn.Module
        Any model whose final layer is an ``nn.Linear`` (found automatically or named by
        ``head``). It is measured in eval mode — dropout off, BatchNorm with its running
        statistics (in train mode BatchNorm mixes examples and per-example quantities are
        undefined) — and left exactly as it was: parameters, buffers, modes, ``requires_grad``
        and the global RNG state.
    layers : list of str, optional
        Modules whose *input* norm is recorded as ``activation_norm`` (default: the head, i.e.
        the penultimate activation).
    head : str, optional
        Name of the final linear layer.
    output_fn : callable, optional
        Picks the logits out of the model's output.
    loss_fn : callable, optional
        ``loss_fn(logits, targets) -> [B]`` per-example losses (default cross-entropy, or the
        logistic loss for a binary head).
    method : {"auto", "fast", "exact"}
        ``"fast"``: per-layer rules; ``"exact"``: torch.func; ``"auto"``: fast where exact.
    per_block : bool
        Also record ``jacobian_norm_block`` per parameter block (module).

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> ds = Probe(net).measure(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), rho=0.05)
    >>> ds["logit_scale"].dims
    ('view', 'example')
    """

    def __init__(self, model: nn.Module, layers=None, *, head: str | None = None,
                 output_fn=None, loss_fn=None, method: str = "auto", per_block: bool = False):
        if method not in ("auto", "fast", "exact"):
            raise ValueError(f"method must be 'auto', 'fast' or 'exact', got {method!r}")
        self.model = model
        self.layers = list(layers) if layers is not None else None
        self.head = head
        self.output_fn = output_fn
        self.loss_fn = loss_fn or per_example_loss
        self.method = method
        self.per_block = per_block
        if head is not None:
            resolve_layers(model, [head])
        if self.layers is not None:
            resolve_layers(model, self.layers)

    # ------------------------------------------------------------------ views
    def _fast_view(self, x, y, layers, plan, offsets=None, rho=None) -> _View:
        if plan.problem:
            raise NotFastError(plan.problem)
        xt = traced(x)
        with torch.enable_grad(), Capture(plan, offsets, inputs=xt) as cap, \
                capture_inputs(layers, skip=cap.busy) as acts:
            logits = model_logits(self.model, xt, self.output_fn)
        check_head(logits.detach(), y)
        cap.check_all_fired(logits)
        jd = one_hot_directions(logits.detach())
        dirs = torch.cat([jd, loss_directions(self.loss_fn)(logits.detach(), y)])
        cots = cap.cotangents(logits, dirs)
        K = jd.shape[0]
        jac = cap.sq_norms({n: [c[:K] for c in v] for n, v in cots.items()})
        grad_cots = {n: [c[K:] for c in v] for n, v in cots.items()}
        offsets = None
        if rho is not None:  # the gradient norms and the SAM view's offsets in one go
            grd, offsets = per_example_offsets(cap, grad_cots, rho)
        else:
            grd = cap.sq_norms(grad_cots)
        return _View(logits.detach(), jac, grd, activation_norms(acts), offsets)

    def _exact_view(self, x, y, layers, plan, eps=None) -> _View:
        logits, jac = exact_block_sq_norms(self.model, x, one_hot_directions, None, plan,
                                           self.output_fn, eps=eps)
        check_head(logits, y)
        _, grd = exact_block_sq_norms(self.model, x, loss_directions(self.loss_fn), y, plan,
                                      self.output_fn, eps=eps)
        return _View(logits, jac, grd, self._exact_acts(x, layers, eps))

    def _exact_acts(self, x, layers, eps):
        if eps is None:
            with torch.no_grad(), capture_inputs(layers) as acts:
                model_logits(self.model, x, self.output_fn)
            return activation_norms(acts)
        model = self.model
        params = {n: p.detach() for n, p in model.named_parameters()}
        params.update(dict(model.named_buffers()))

        def one(e, xi):
            with capture_inputs(layers) as acts:
                functional_call(model, {**params, **{n: params[n] + e[n] for n in e}},
                                (xi[None],))
            return {n: v[0] for n, v in activation_norms(acts).items()}

        with torch.no_grad():
            return vmap(one)(eps, x)

    # ------------------------------------------------------------------ measure
    def measure(self, inputs: Tensor, targets: Tensor, rho: float = 0.05, m: int | None = 1, *,
                example_ids=None, is_noisy=None, true_labels=None) -> xr.Dataset:
        """Measure a batch in both views.

        Parameters
        ----------
        inputs, targets : Tensor
            The probe batch ``[B, ...]`` and its (observed) labels ``[B]``.
        rho : float
            Perturbation radius of the SAM view (``ρ = 0`` makes both views equal).
        m : int or None
            Examples per perturbation group: ``1`` = 1-SAM's per-example ``ε_i``, ``None`` = one
            ε for the whole batch; groups are consecutive (the last one holds the remainder).
        example_ids, is_noisy, true_labels : array-like, optional
            Coordinates along ``example`` (stable ids, the noise mask, the clean labels).

        Returns
        -------
        xarray.Dataset
            dims ``view`` (["sgd", "sam"]), ``example``, ``layer``, ``module``; variables
            ``loss``, ``margin``, ``logit_scale``, ``jacobian_norm``, ``grad_norm`` over
            (view, example), ``activation_norm`` over (view, example, layer),
            ``last_layer_weight_norm`` (scalar, at w) and ``weight_norm`` over module.
        """
        check_inputs(inputs)
        check_rho_m(rho, m)
        if not isinstance(targets, Tensor) or targets.shape[:1] != inputs.shape[:1]:
            raise ValueError(
                f"targets must be a tensor of shape [B] = [{inputs.shape[0]}] matching inputs, "
                f"got {getattr(targets, 'shape', type(targets))}"
            )
        B = inputs.shape[0]
        model = self.model
        with measuring(model):
            head = self.head or find_head(model, inputs, self.output_fn)
            self.head = head
            layers = resolve_layers(model, self.layers or [head])
            plan = make_plan(model)
            use_fast = self.method != "exact"
            try:
                sgd, sam = self._both_views(inputs, targets, rho, m, layers, plan, use_fast)
            except NotFastError as err:
                if self.method == "fast":
                    raise ValueError(f"method='fast' cannot be exact for this model: {err}; "
                                     "use method='exact' or 'auto'") from err
                sgd, sam = self._both_views(inputs, targets, rho, m, layers, plan, False)
            wn = weight_norms(model)
        return self._dataset(sgd, sam, targets, wn, head, list(layers), rho, m, B,
                             example_ids, is_noisy, true_labels)

    def _both_views(self, x, y, rho, m, layers, plan, fast):
        if fast:
            sgd = self._fast_view(x, y, layers, plan, rho=rho if m == 1 else None)
        else:
            sgd = self._exact_view(x, y, layers, plan)
        if m == 1:
            if fast:
                return sgd, self._fast_view(x, y, layers, plan, offsets=sgd.offsets)
            eps = sam_epsilon(self.model, x, y, rho, 1, loss_fn=self.loss_fn,
                              output_fn=self.output_fn)
            return sgd, self._exact_view(x, y, layers, plan, eps=eps)
        eps = sam_epsilon(self.model, x, y, rho, m, loss_fn=self.loss_fn,
                          output_fn=self.output_fn)
        parts = []
        for g, s in enumerate(group_slices(x.shape[0], m)):
            with perturbed(self.model, {n: e[g] for n, e in eps.items()}):
                view = self._fast_view if fast else self._exact_view
                parts.append(view(x[s], y[s], layers, plan))
        return sgd, _cat_views(parts)

    # ------------------------------------------------------------------ dataset
    def _dataset(self, sgd, sam, targets, wn, head, layers, rho, m, B, example_ids, is_noisy,
                 true_labels) -> xr.Dataset:
        def np_(t):
            return t.detach().to("cpu", torch.float64 if t.dtype == torch.float64
                                  else torch.float32).numpy()

        y = targets.detach().cpu()

        def stack(fn):
            return np.stack([np_(fn(v)) for v in (sgd, sam)])

        data = {
            "loss": (("view", "example"), stack(lambda v: self.loss_fn(v.logits, y.to(
                v.logits.device)))),
            "margin": (("view", "example"), stack(lambda v: margin(v.logits, y))),
            "logit_scale": (("view", "example"), stack(lambda v: logit_scale(v.logits, y))),
            "jacobian_norm": (("view", "example"),
                              stack(lambda v: _total(v.jac_sq, v.logits).sqrt())),
            "grad_norm": (("view", "example"), stack(lambda v: _total(v.grad_sq, v.logits).sqrt())),
            "activation_norm": (("view", "example", "layer"), np.stack([
                np.stack([np_(v.acts[n]) for n in layers], axis=-1) for v in (sgd, sam)])),
            "last_layer_weight_norm": ((), np_(wn[head])),
            "weight_norm": (("module",), np.array([np_(w) for w in wn.values()])),
        }
        if self.per_block:
            blocks = sorted(set(sgd.jac_sq) | set(sam.jac_sq))
            zero = sgd.logits.new_zeros(B)
            data["jacobian_norm_block"] = (("view", "example", "block"), np.stack([
                np.stack([np_(v.jac_sq.get(b, zero).sqrt()) for b in blocks], -1)
                for v in (sgd, sam)]))
        coords = {
            "view": list(VIEWS),
            "example": np.asarray(example_ids) if example_ids is not None else np.arange(B),
            "label": ("example", y.numpy()),
            "layer": layers,
            "module": list(wn),
        }
        if self.per_block:
            coords["block"] = blocks
        if is_noisy is not None:
            coords["is_noisy"] = ("example", np.asarray(is_noisy, dtype=bool))
        if true_labels is not None:
            coords["true_label"] = ("example", np.asarray(true_labels))
        for name, values in coords.items():
            n = len(values[1]) if isinstance(values, tuple) else len(values)
            dim = values[0] if isinstance(values, tuple) else name
            if dim == "example" and n != B:
                raise ValueError(f"{name} has {n} entries but the batch has {B} examples")
        attrs = {"rho": float(rho), "m": 0 if m is None else int(m), "head": head,
                 "method": self.method, "sam_diagnostics_version": __version__}
        return xr.Dataset(data, coords=coords, attrs=attrs)


def _cat_views(parts: list[_View]) -> _View:
    keys = parts[0].jac_sq.keys()
    return _View(
        torch.cat([p.logits for p in parts]),
        {k: torch.cat([p.jac_sq[k] for p in parts]) for k in keys},
        {k: torch.cat([p.grad_sq[k] for p in parts]) for k in parts[0].grad_sq},
        {k: torch.cat([p.acts[k] for p in parts]) for k in parts[0].acts},
    )

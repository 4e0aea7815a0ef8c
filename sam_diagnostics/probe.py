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

from ._version import __version__
from .engine import Engine, check_inputs, check_targets, logit_grad, one_hot_directions
from .hooks import measuring, unwrap
from .logit_terms import check_head, logit_scale, margin, per_example_loss
from .norms import find_head, resolve_layers, weight_norms
from .perturb import check_rho_m, epsilon, group_slices, perturbed
from .schema import m_to_disk

__all__ = ["Probe", "VIEWS"]

VIEWS = ("sgd", "sam")


@dataclass
class _View:
    logits: Tensor
    jac_sq: dict[str, Tensor]
    grad_sq: dict[str, Tensor]
    acts: dict[str, Tensor]


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
        if not isinstance(model, nn.Module):
            raise TypeError(f"Probe needs a torch.nn.Module, got {type(model).__name__}")
        if method not in ("auto", "fast", "exact"):
            raise ValueError(f"method must be 'auto', 'fast' or 'exact', got {method!r}")
        self.model = model = unwrap(model)
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
    def _view(self, p, y, grad_sq=None) -> _View:
        """Jacobian and gradient norms of one pass (``grad_sq`` if already computed)."""
        z = p.logits.detach()
        check_head(z, y)
        jac = p.sq_norms(one_hot_directions(z))
        if grad_sq is None:
            grad_sq = p.sq_norms(logit_grad(self.loss_fn, p.logits, y)[None])
        return _View(z, jac, grad_sq, p.acts)

    def _both_views(self, engine: Engine, plan, x, y, rho, m, adaptive, watch):
        at_w = engine.run(plan, x, watch=watch)
        check_head(at_w.logits.detach(), y)
        delta = logit_grad(self.loss_fn, at_w.logits, y)
        if m == 1 or (m is None and x.shape[0] == 1):
            if adaptive:
                grad_sq, off = at_w.adaptive_offsets(delta, rho, engine.params())
            else:
                grad_sq, off = at_w.offsets(delta, rho)
            sgd = self._view(at_w, y, grad_sq)
            return sgd, self._view(engine.run(plan, x, offsets=off, watch=watch), y)
        sgd = self._view(at_w, y)
        parts = []
        for s in group_slices(x.shape[0], m):
            g = engine.run(plan, x[s]).grad(delta[s] / (s.stop - s.start))
            eps = epsilon(g, rho, engine.params(), adaptive)
            with perturbed(self.model, eps):
                parts.append(self._view(engine.run(plan, x[s], watch=watch), y[s]))
        return sgd, _cat_views(parts)

    # ------------------------------------------------------------------ measure
    def measure(self, inputs: Tensor, targets: Tensor, rho: float = 0.05, m: int | None = 1, *,
                adaptive: bool = False, example_ids=None, is_noisy=None,
                true_labels=None) -> xr.Dataset:
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
        adaptive : bool
            ASAM's ``ε = ρ T² g / ‖T g‖`` with ``T = |w|`` (the view an ``adaptive=True``
            optimizer takes).
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
        model = self.model
        check_inputs(inputs, model)
        check_rho_m(rho, m)
        check_targets(targets, inputs)
        B = inputs.shape[0]
        engine = Engine(model, output_fn=self.output_fn, method=self.method,
                        loss_fn=self.loss_fn)
        with measuring(model):
            head = self.head or find_head(model, inputs, self.output_fn)
            self.head = head
            watch = resolve_layers(model, self.layers or [head])
            parts = engine.per_chunk(inputs, lambda plan, s: self._both_views(
                engine, plan, inputs[s], targets[s], rho, m, adaptive, watch),
                multiple=B if m is None else m)
            sgd, sam = (_cat_views([p[k] for p in parts]) for k in (0, 1))
            wn = weight_norms(model)
        return self._dataset(sgd, sam, targets, wn, head, list(watch), rho, m, adaptive, B,
                             example_ids, is_noisy, true_labels)

    # ------------------------------------------------------------------ dataset
    def _dataset(self, sgd, sam, targets, wn, head, layers, rho, m, adaptive, B, example_ids,
                 is_noisy, true_labels) -> xr.Dataset:
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
        attrs = {"rho": float(rho), "m": m_to_disk(m), "adaptive": int(adaptive), "head": head,
                 "method": self.method, "sam_diagnostics_version": __version__}
        return xr.Dataset(data, coords=coords, attrs=attrs)


def _cat_views(parts: list[_View]) -> _View:
    if len(parts) == 1:
        return parts[0]
    keys = parts[0].jac_sq.keys()
    return _View(
        torch.cat([p.logits for p in parts]),
        {k: torch.cat([p.jac_sq[k] for p in parts]) for k in keys},
        {k: torch.cat([p.grad_sq[k] for p in parts]) for k in parts[0].grad_sq},
        {k: torch.cat([p.acts[k] for p in parts]) for k in parts[0].acts},
    )

"""A Hugging Face ``transformers.Trainer`` callback that records a run with
:class:`~sam_diagnostics.Recorder`, into the same store schema as a plain loop.

Needs the optional extra: ``pip install 'sam-diagnostics[hf]'`` (transformers, tensorboard).

Example
-------
::

    from sam_diagnostics.integrations.hf import DiagnosticsCallback

    callback = DiagnosticsCallback("run.zarr", probe=256, test=eval_dataset,
                                   live="tb/run", config={"noise_rate": 0.3})
    trainer = Trainer(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      data_collator=collator, callbacks=[callback])
    callback.attach(trainer)  # optional: also mirror the live scalars to the Trainer's loggers
    trainer.train()
    ds = callback.dataset     # or sam_diagnostics.open_run("run.zarr")

How the text model meets the engine
-----------------------------------
:class:`~sam_diagnostics.Probe` and :class:`~sam_diagnostics.Recorder` take one input tensor
per batch (a :class:`~sam_diagnostics.data.NoisyDataset`), while a transformers model takes a
dict (``input_ids``, ``attention_mask``...) and returns a ``ModelOutput``. The callback
therefore

- packs the examples (``train``, ``test``, ``val``: lists / ``datasets.Dataset`` of dicts, as
  given to the Trainer) once, padded by the Trainer's data collator, into a
  ``NoisyDataset`` whose inputs are ``[N, len(keys), S]`` (:func:`pack_examples`; labels from
  ``labels``/``label``, and ``true_label``, ``is_noisy``, ``example_id`` where the examples
  carry them), and
- probes :class:`TextClassifier`, a thin ``nn.Module`` around the Trainer's (unwrapped) model
  that unpacks that tensor into keyword arguments, passes explicit per-example ``position_ids``
  and a prepared 4-D attention mask (so the per-layer fast path sees per-example inputs and
  ``torch.func.vmap`` sees no data-dependent branch in the mask code), and returns
  ``output.logits``. Its parameters are the model's own: module names in the store carry a
  ``model.`` prefix.

Steps follow ``state.global_step`` (optimizer steps: gradient accumulation counts right) and
``epoch`` is fractional between epoch ends, as the Trainer counts them; records are made on the
Recorder's schedule (``every_epochs`` / ``every_steps``) and at the end of training.
``batch_loss`` is not recorded (the Trainer does not hand its minibatch losses to callbacks;
its own ``loss`` log has them). Only the world-process-zero records. The Trainer's own
optimizer steps; :class:`SAMTrainer` makes its gradient batch SAM's (per
micro-batch); the per-example variants (1-SAM, L-SAM, J-SAM) are :class:`~sam_diagnostics.SAM`'s
in a plain loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from typing import Any

import torch
from torch import Tensor, nn

try:
    from transformers import Trainer, TrainerCallback
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sam_diagnostics.integrations.hf needs transformers: pip install 'sam-diagnostics[hf]'"
    ) from err

from ..data import NoisyDataset
from ..live import CallbackSink, as_sinks, close_sinks, log_record
from ..perturb import perturbed
from ..record import Recorder
from ..store import RunStore

__all__ = ["DiagnosticsCallback", "SAMTrainer", "TextClassifier", "pack_examples",
           "unwrap_model"]

DEFAULT_KEYS = ("input_ids", "attention_mask")
_MAX_EXACT_ID = 2**24  # integers up to this are exact in float32 (NoisyDataset's input dtype)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model under ``DataParallel`` / ``DistributedDataParallel`` / ``torch.compile``
    wrappers (the parameters are shared, so measuring it measures the trained model)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find logits in a {type(output).__name__}; pass output_fn=...")


def _accepts(module: nn.Module, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forwards
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class TextClassifier(nn.Module):
    """A transformers sequence classifier as a model of one packed ``[B, len(keys), S]`` tensor.

    Parameters
    ----------
    model : nn.Module
        A transformers model (``*ForSequenceClassification`` or any module taking ``keys`` as
        keyword arguments) returning logits ``[B, C]`` (or a ``ModelOutput`` with ``logits``).
    keys : sequence of str
        The keyword arguments packed along dim 1, in order (integer-valued).
    output_fn : callable, optional
        Picks the logits from the model's output (default: ``output.logits``).
    causal : bool, optional
        Whether the model attends causally (default: any submodule has ``is_causal = True``,
        as transformers' decoder attention modules do).
    prepare_mask : bool
        Replace a 2-D ``attention_mask`` by the 4-D mask transformers would build (boolean for
        the SDPA attention implementation, additive for the others), with explicit
        ``position_ids`` ``0..S-1`` (transformers' default for right padding). Keeps the
        model's output unchanged and makes it ``vmap``-friendly.

    Examples
    --------
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> bert = BertForSequenceClassification(BertConfig(
    ...     vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
    ...     intermediate_size=16, num_labels=3))
    >>> ids = torch.randint(1, 30, (4, 5)); mask = torch.ones(4, 5, dtype=torch.long)
    >>> TextClassifier(bert)(torch.stack([ids, mask], 1).float()).shape
    torch.Size([4, 3])
    """

    def __init__(self, model: nn.Module, keys: Sequence[str] = DEFAULT_KEYS, *,
                 output_fn: Callable[[Any], Tensor] | None = None, causal: bool | None = None,
                 prepare_mask: bool = True):
        super().__init__()
        self.model = model
        self.keys = tuple(keys)
        self.output_fn = output_fn or _logits
        self.causal = (any(getattr(m, "is_causal", False) is True for m in model.modules())
                       if causal is None else bool(causal))
        self.prepare_mask = prepare_mask and "attention_mask" in self.keys
        self.positions = prepare_mask and _accepts(model, "position_ids") and \
            "position_ids" not in self.keys

    def _mask(self, mask: Tensor) -> Tensor:
        B, S = mask.shape
        keep = mask.bool()[:, None, None, :]
        if self.causal:
            keep = keep & torch.ones(S, S, dtype=torch.bool, device=mask.device).tril()
        else:
            keep = keep.expand(B, 1, S, S)
        config = getattr(self.model, "config", None)
        if getattr(config, "_attn_implementation", "sdpa") in ("sdpa", None):
            return keep
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()),
                     torch.float32)
        return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(
            ~keep, torch.finfo(dtype).min)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != len(self.keys):
            raise ValueError(f"expected packed inputs [B, {len(self.keys)}, S] for keys "
                             f"{self.keys}, got {tuple(x.shape)}")
        kwargs = {k: x[:, j].long() for j, k in enumerate(self.keys)}
        B, S = x.shape[0], x.shape[-1]
        if self.positions:
            kwargs["position_ids"] = torch.arange(S, device=x.device).expand(B, S)
        if self.prepare_mask:
            kwargs["attention_mask"] = self._mask(kwargs["attention_mask"])
        return self.output_fn(self.model(**kwargs))


# --------------------------------------------------------------------------------------------
# Packing examples
# --------------------------------------------------------------------------------------------


def _value(item: Mapping, *names: str, default: Any = None) -> Any:
    for name in names:
        if name in item and item[name] is not None:
            value = item[name]
            return value.item() if isinstance(value, Tensor) and value.dim() == 0 else value
    return default


def _pad(features: list[dict], keys: Sequence[str], pad_token_id: int) -> dict[str, Tensor]:
    S = max(len(f[keys[0]]) for f in features)
    out = {}
    for k in keys:
        fill = pad_token_id if k == "input_ids" else 0
        rows = [torch.as_tensor(f[k], dtype=torch.long) for f in features]
        out[k] = torch.stack([torch.cat([r, r.new_full((S - len(r),), fill)]) for r in rows])
    return out


def pack_examples(examples: Any, *, keys: Sequence[str] = DEFAULT_KEYS,
                  collator: Callable | None = None, num_classes: int | None = None,
                  pad_token_id: int = 0) -> NoisyDataset:
    """Pack tokenized examples into a :class:`~sam_diagnostics.data.NoisyDataset` for
    :class:`TextClassifier`.

    Parameters
    ----------
    examples : NoisyDataset or sequence of mappings
        A ``NoisyDataset`` (returned as it is), or what a Trainer takes as a dataset: a list,
        ``torch.utils.data.Dataset`` or ``datasets.Dataset`` whose items are dicts with
        ``keys``, ``labels`` (or ``label``) and optionally ``true_label``, ``is_noisy``
        (default: ``label != true_label``) and ``example_id`` (default: the position).
    keys : sequence of str
        The model inputs to pack, in :class:`TextClassifier`'s order.
    collator : callable, optional
        Pads a list of features to one batch (the Trainer's ``data_collator``); all examples
        are padded together. Default: right-pad with ``pad_token_id`` (``input_ids``) and 0.
    num_classes : int, optional
        Default: 1 + the largest label.

    Returns
    -------
    NoisyDataset
        inputs ``[N, len(keys), S]`` (float32 holding the integer ids exactly).

    Examples
    --------
    >>> ds = pack_examples([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "label": 1},
    ...                     {"input_ids": [8], "attention_mask": [1], "label": 0}])
    >>> ds.inputs.shape, ds.labels.tolist(), ds.inputs[1, 0].tolist()
    (torch.Size([2, 2, 3]), [1, 0], [8.0, 0.0, 0.0])
    """
    if isinstance(examples, NoisyDataset):
        return examples
    items = [examples[i] for i in range(len(examples))]
    if not items:
        raise ValueError("no examples to pack")
    keys = list(keys)
    missing = [k for k in keys if k not in items[0]]
    if missing:
        raise KeyError(f"the examples have no {missing} (they have {sorted(items[0])}); "
                       "pass keys=... naming the model inputs")
    labels = [_value(it, "labels", "label") for it in items]
    if any(v is None for v in labels):
        raise KeyError("every example needs a 'labels' or 'label' entry")
    labels = torch.as_tensor([int(v) for v in labels])
    true = torch.as_tensor([int(_value(it, "true_label", "true_labels", default=int(y)))
                            for it, y in zip(items, labels)])
    noisy = torch.as_tensor([bool(_value(it, "is_noisy", default=bool(y != t)))
                             for it, y, t in zip(items, labels, true)])
    ids = torch.as_tensor([int(_value(it, "example_id", default=i))
                           for i, it in enumerate(items)])
    # what the Trainer's collator sees once unused columns are dropped: inputs and the label
    features = [{k: it[k] for k in (*keys, "label", "labels") if k in it} for it in items]
    if collator is not None:
        batch = collator(features)
        packed = {k: torch.as_tensor(batch[k]) for k in keys}
    else:
        packed = _pad(features, keys, pad_token_id)
    stacked = torch.stack([packed[k].long() for k in keys], dim=1)
    if stacked.numel() and stacked.abs().max() >= _MAX_EXACT_ID:
        raise ValueError("input values >= 2**24 are not exact in float32")
    return NoisyDataset(stacked.float(), labels, true, noisy, ids,
                        num_classes=num_classes or int(labels.max()) + 1)


# --------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------


def _steps_per_epoch(loader: Any, args: Any) -> int | None:
    """Optimizer steps per epoch, as the Trainer counts them (None for iterable loaders)."""
    try:
        n = len(loader)
    except TypeError:
        return None
    ga = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    return max(n // ga + int(n % ga > 0), 1)


def _collate_fn(loader: Any) -> Callable | None:
    fn = getattr(loader, "collate_fn", None)
    # transformers wraps the collator to drop unused columns; the wrapped one pads the same way
    return getattr(fn, "data_collator", fn)


class DiagnosticsCallback(TrainerCallback):
    """Record probe diagnostics and training curves while a ``transformers.Trainer`` trains.

    Parameters
    ----------
    out : path, RunStore or None
        The zarr store to create (``None``: in memory, see :attr:`dataset`).
    probe : NoisyDataset, sequence of examples, or int
        The probe set, or its size (then drawn from ``train``, stratified over true label and
        noise, as :class:`~sam_diagnostics.Recorder` does).
    train, test, val : NoisyDataset or sequence of examples, optional
        Splits for the training curves (see :func:`pack_examples`). ``train`` defaults to the
        Trainer's training dataset; ``test`` is typically its ``eval_dataset``.
    config : mapping, optional
        The run's configuration; defaults come from the ``TrainingArguments`` (``optimizer``
        = ``args.optim``, ``lr``, ``weight_decay``, ``batch_size``, ``epochs``, ``seed``) and
        the model (``model`` = ``config.model_type``).
    keys : sequence of str
        The model inputs (default ``input_ids``, ``attention_mask``).
    output_fn : callable, optional
        Picks the logits from the model's output (default ``output.logits``).
    live : path, callable, sink or list, optional
        Where to mirror the per-record live scalars (:mod:`sam_diagnostics.live`): a
        TensorBoard log directory, a ``fn(scalars, step)``, a sink. After :meth:`attach`, they
        also go to the Trainer's own loggers (``report_to``) under ``sd/``.
    every_epochs, every_steps : int, optional
        The Recorder's schedule (default: every epoch).
    **recorder_options
        Everything else :class:`~sam_diagnostics.Recorder` takes (``rho``, ``m``,
        ``probe_options`` such as ``head=`` or ``method=``, ``probe_batch_size``...).

    Examples
    --------
    >>> cb = DiagnosticsCallback(None, probe=32, live=[])
    >>> cb.recorder is None
    True
    """

    def __init__(self, out: str | PathLike | RunStore | None, probe: Any = 256, *,
                 train: Any = None, test: Any = None, val: Any = None,
                 config: Mapping[str, Any] | None = None, keys: Sequence[str] = DEFAULT_KEYS,
                 output_fn: Callable[[Any], Tensor] | None = None, live: Any = None,
                 every_epochs: int | None = 1, every_steps: int | None = None,
                 trainer: Any = None, **recorder_options: Any):
        super().__init__()
        self.out, self.probe = out, probe
        self.splits = {"train": train, "test": test, "val": val}
        self.config = dict(config or {})
        self.keys, self.output_fn = tuple(keys), output_fn
        self.sinks = as_sinks(live)
        self.options = dict(every_epochs=every_epochs, every_steps=every_steps,
                            **recorder_options)
        self.trainer = None
        self.recorder: Recorder | None = None
        self.classifier: TextClassifier | None = None
        self.last_scalars: dict[str, float] = {}
        if trainer is not None:
            self.attach(trainer)

    def attach(self, trainer: Any) -> DiagnosticsCallback:
        """Register with ``trainer`` (if not yet) and mirror the live scalars to its loggers."""
        if self not in getattr(getattr(trainer, "callback_handler", None), "callbacks", [self]):
            trainer.add_callback(self)
        self.trainer = trainer
        return self

    # ---------------------------------------------------------------- set-up
    def _default_config(self, args, model) -> dict[str, Any]:
        cfg: dict[str, Any] = {}
        if args is not None:
            optim = getattr(args, "optim", None)
            cfg.update(
                optimizer=str(getattr(optim, "value", optim) or "trainer"),
                lr=getattr(args, "learning_rate", None),
                weight_decay=getattr(args, "weight_decay", None),
                batch_size=getattr(args, "per_device_train_batch_size", None),
                epochs=getattr(args, "num_train_epochs", None),
                seed=getattr(args, "seed", None),
                gradient_accumulation_steps=getattr(args, "gradient_accumulation_steps", None),
            )
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        cfg["model"] = model_type or type(model).__name__
        cfg["integration"] = "transformers.Trainer"
        return {k: v for k, v in cfg.items() if v is not None}

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None,
                       **kwargs):
        if not state.is_world_process_zero or self.recorder is not None:
            return
        if model is None:
            raise ValueError("the Trainer passed no model to the callback")
        model = unwrap_model(model)
        collator = _collate_fn(train_dataloader)
        config = getattr(model, "config", None)
        num_classes = getattr(config, "num_labels", None)
        pad = getattr(config, "pad_token_id", None) or 0
        train = self.splits["train"]
        if train is None and train_dataloader is not None:
            train = train_dataloader.dataset
        packed = {name: None if data is None else pack_examples(
            data, keys=self.keys, collator=collator, num_classes=num_classes, pad_token_id=pad)
            for name, data in {**self.splits, "train": train}.items()}
        probe = self.probe
        if not isinstance(probe, (int, NoisyDataset)):
            probe = pack_examples(probe, keys=self.keys, collator=collator,
                                  num_classes=num_classes, pad_token_id=pad)
        self.classifier = TextClassifier(model, self.keys, output_fn=self.output_fn)
        options = dict(self.options)
        options.setdefault("eval_batch_size", getattr(args, "per_device_eval_batch_size", 64))
        if "steps_per_epoch" not in options:  # fractional epochs for step-scheduled records
            options["steps_per_epoch"] = _steps_per_epoch(train_dataloader, args)
        self.recorder = Recorder(
            self.classifier, self.out, probe, train=packed["train"], test=packed["test"],
            val=packed["val"], config={**self._default_config(args, model), **self.config},
            record_initial=False, **options)
        self.recorder.global_step = int(state.global_step)  # resumed runs continue their steps
        self._emit(self.recorder.record())

    def _emit(self, ds) -> None:
        if ds is None:
            return
        sinks = list(self.sinks)
        if self.trainer is not None:
            sinks.append(CallbackSink(lambda s, step: self.trainer.log(dict(s)), prefix="sd/",
                                      finite_only=True))
        if sinks:
            self.last_scalars = log_record(ds, sinks)

    def _active(self, state) -> bool:
        return self.recorder is not None and state.is_world_process_zero

    # ---------------------------------------------------------------- events
    def on_step_end(self, args, state, control, **kwargs):
        if not self._active(state):
            return
        rec = self.recorder
        while rec.global_step < state.global_step:
            self._emit(rec.step())

    def on_epoch_end(self, args, state, control, **kwargs):
        if not self._active(state):
            return
        self.on_step_end(args, state, control)  # may already have ended the epoch
        rec = self.recorder
        while rec.epochs_done < round(state.epoch or 0):
            self._emit(rec.epoch_end())

    def on_train_end(self, args, state, control, **kwargs):
        if not self._active(state):
            return
        rec = self.recorder
        self.on_step_end(args, state, control)
        if rec.last_recorded_step != rec.global_step:
            self._emit(rec.record())
        rec.close(complete=True)
        close_sinks(self.sinks)

    @property
    def dataset(self):
        """The recorded run (``None`` before training started)."""
        return None if self.recorder is None else self.recorder.dataset()


# --------------------------------------------------------------------------------------------
# A SAM step inside the Trainer
# --------------------------------------------------------------------------------------------


class SAMTrainer(Trainer):
    """``transformers.Trainer`` whose gradient is SAM's: ``∇L_B(w + ε)``, ``ε = ρ ∇L_B / ‖∇L_B‖``.

    Batch SAM per micro-batch (m = the per-device batch; with gradient accumulation, one ε per
    micro-batch, i.e. m-sharpness with m = ``per_device_train_batch_size``; under DDP one per
    replica). Each micro-batch costs two forward and two backward passes: the first gradient is
    taken with ``torch.autograd.grad`` (``.grad`` is not touched), the second is the Trainer's
    own ``training_step`` at ``w + ε`` (mixed precision, loss scaling and gradient accumulation
    as usual), and ``w`` is restored bit-exactly (:func:`~sam_diagnostics.perturbed`) before
    the Trainer's optimizer steps. The logged ``loss`` is the one at ``w + ε``. The per-example
    variants (1-SAM, L-SAM, J-SAM) need the per-example machinery of
    :class:`~sam_diagnostics.SAM`, which takes tensor inputs: use it in a plain loop.

    Parameters
    ----------
    rho : float
        Perturbation radius.
    *args, **kwargs
        Everything ``transformers.Trainer`` takes.

    Examples
    --------
    ::

        trainer = SAMTrainer(model, args, rho=0.05, train_dataset=train, callbacks=[callback])
        trainer.train()
    """

    def __init__(self, *args: Any, rho: float = 0.05, **kwargs: Any):
        if not rho >= 0:
            raise ValueError(f"rho must be >= 0, got {rho!r}")
        super().__init__(*args, **kwargs)
        self.rho = float(rho)
        for cb in self.callback_handler.callbacks:  # the run's configuration, unless given
            if isinstance(cb, DiagnosticsCallback):
                cb.config.setdefault("optimizer", "sam")
                cb.config.setdefault("rho", self.rho)

    def training_step(self, model, inputs, *args, **kwargs):
        inner = unwrap_model(model)
        named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
        model.train()
        prepared = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, prepared)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, grads)]
        norm = torch.sqrt(sum(g.detach().float().pow(2).sum() for g in grads))
        scale = self.rho / norm if norm > 0 else 0.0
        eps = {n: (g.detach() * scale).to(p.dtype) for (n, p), g in zip(named, grads)}
        with perturbed(inner, eps):
            return super().training_step(model, inputs, *args, **kwargs)

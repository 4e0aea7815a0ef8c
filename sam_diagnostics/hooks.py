"""Guards that keep the model exactly as it was, checks of the model, and input capture.

* :func:`measuring` — eval mode, no fused attention fast path, global RNG and plain tensor
  attributes (legacy ``weight_norm``'s recomputed ``weight``) restored on exit;
* :func:`frozen_buffers` — buffers (BatchNorm running statistics) restored bit-exactly;
* :func:`check_model` — refuses models whose per-example quantities are undefined or whose
  forward rewrites its own weights;
* :func:`capture_inputs` — the (first positional) input of named modules, per call.

Hooks are always removed, also when the forward raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .errors import Unsupported

__all__ = ["measuring", "frozen_buffers", "kept_attributes", "check_model", "check_per_example",
           "capture_inputs", "unfused_attention", "unwrap"]


@contextlib.contextmanager
def capture_inputs(modules: dict[str, nn.Module], skip=None) -> Iterator[dict[str, list[Tensor]]]:
    """Record the (first positional) input of each named module, in the graph, per call.

    ``skip()`` returning True ignores a call (a rule evaluating the module itself).

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> with capture_inputs({"2": net[2]}) as acts:
    ...     _ = net(torch.randn(5, 3))
    >>> acts["2"][0].shape
    torch.Size([5, 4])
    """
    store: dict[str, list[Tensor]] = {name: [] for name in modules}
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: None if skip is not None and skip()
                else store[name].append(args[0])
            ))
        yield store
    finally:
        for h in handles:
            h.remove()


def check_per_example(model: nn.Module) -> None:
    """Raise if a module couples the examples of a batch in the current mode (BatchNorm in
    train mode), where per-example quantities are undefined."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                f"module {name!r} is BatchNorm in train mode: it mixes the examples of a batch, "
                "so per-example quantities are undefined. Put it in eval mode (running "
                "statistics) or replace it by GroupNorm/LayerNorm (as the SAM label-noise paper "
                "did)"
            )


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (the rules see
    through it; per-example passes never trigger the wrapper's gradient synchronisation)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def check_model(model: nn.Module) -> None:
    """Refuse models for which no exact per-example path exists (with the way out)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            raise Unsupported(
                f"module {name!r} is nn.Embedding(max_norm={module.max_norm}): its forward "
                "rewrites the embedding weight in place, so measuring (or a per-example SAM "
                "pass) would change the model. Set max_norm=None and renormalize outside the "
                "forward (e.g. torch.renorm on the weight after each optimizer step)"
            )


@contextlib.contextmanager
def kept_attributes(model: nn.Module) -> Iterator[None]:
    """Restore every module's plain tensor attributes on exit (hooks such as the legacy
    ``weight_norm`` recompute ``module.weight`` in the forward; a functional evaluation must not
    leave its tensors behind)."""
    saved = [(m, k, v) for m in model.modules() for k, v in vars(m).items()
             if isinstance(v, Tensor)]
    try:
        yield
    finally:
        for m, k, v in saved:
            setattr(m, k, v)


@contextlib.contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (e.g. BatchNorm running statistics) bit-exactly on exit."""
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])


@contextlib.contextmanager
def unfused_attention() -> Iterator[None]:
    """Run ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` on their unfused,
    differentiable path (their eval-mode fast path has no derivative)."""
    fast = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


@contextlib.contextmanager
def measuring(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluate ``model`` in eval mode and put everything back afterwards.

    Train/eval mode of every module, the global torch RNG state, plain tensor attributes and
    the fused-attention setting are restored on exit, also on exceptions. Dropout is therefore
    off and BatchNorm uses its running statistics; ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` run their unfused (differentiable) path.
    """
    check_model(model)
    modes = {m: m.training for m in model.modules()}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        model.eval()
        with kept_attributes(model), unfused_attention():
            yield model
    finally:
        for m, mode in modes.items():
            m.training = mode
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)

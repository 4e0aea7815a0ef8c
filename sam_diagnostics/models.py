"""The model zoo used by the command line and the analyses.

Every model ends in an ``nn.Linear`` called ``head`` (``model.head``), registered last, whose
input is the penultimate activation ``a`` and whose weight is the last-layer matrix ``V`` of the
paper. There is no BatchNorm anywhere (per-example quantities are undefined with it in train
mode); the image models use GroupNorm. Activations are separate, non-inplace ``nn.ReLU``
modules, each called once per forward, so hooks on them are safe.

Examples
--------
>>> import torch
>>> from sam_diagnostics.models import build_model
>>> model = build_model("mlp", (40,), 10, seed=0)
>>> model(torch.zeros(8, 40)).shape
torch.Size([8, 10])
>>> model.head
Linear(in_features=256, out_features=10, bias=True)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["MODELS", "NORMS", "BasicBlock", "ResNet18", "build_model"]

#: Names accepted by :func:`build_model`.
MODELS: tuple[str, ...] = ("linear", "mlp", "cnn", "resnet18", "two_layer_linear")

#: Normalization layers accepted by ``build_model("resnet18", ..., norm=...)``.
NORMS: tuple[str, ...] = ("layer", "group")

_CNN_CHANNELS = 32


def _shape(input_shape: int | Sequence[int]) -> tuple[int, ...]:
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
    if not shape or len(shape) > 3 or any(int(s) != s or s < 1 for s in shape):
        raise ValueError(
            "input_shape must be (features,), (channels, length) or (channels, height, width) "
            f"with positive sizes, got {input_shape!r}"
        )
    return tuple(int(s) for s in shape)


def _conv_input(shape: tuple[int, ...]) -> tuple[list[tuple[str, nn.Module]], int, int]:
    """Modules that give inputs a channel axis, the channel count and the spatial rank."""
    if len(shape) == 1:  # [N, L] -> [N, 1, L]
        return [("unflatten", nn.Unflatten(1, (1, shape[0])))], 1, 1
    return [], shape[0], len(shape) - 1


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def _linear(shape: tuple[int, ...], outputs: int) -> nn.Module:
    return nn.Sequential(
        OrderedDict([("flatten", nn.Flatten()), ("head", nn.Linear(math.prod(shape), outputs))])
    )


def _mlp(shape: tuple[int, ...], outputs: int, width: int) -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            [
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(math.prod(shape), width)),
                ("relu1", nn.ReLU()),
                ("fc2", nn.Linear(width, width)),
                ("relu2", nn.ReLU()),
                ("head", nn.Linear(width, outputs)),
            ]
        )
    )


def _two_layer_linear(shape: tuple[int, ...], outputs: int, width: int) -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            [
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(math.prod(shape), width, bias=False)),
                ("head", nn.Linear(width, outputs, bias=False)),
            ]
        )
    )


def _cnn(shape: tuple[int, ...], outputs: int) -> nn.Module:
    layers, in_channels, rank = _conv_input(shape)
    conv = nn.Conv1d if rank == 1 else nn.Conv2d
    spatial = list(shape[1:]) if len(shape) > 1 else [shape[0]]
    c = _CNN_CHANNELS
    for i, (kernel, stride) in enumerate([(5, 1), (3, 2), (3, 2)], start=1):
        spatial = [_conv_out(s, kernel, stride) for s in spatial]
        if min(spatial) < 1:
            raise ValueError(f"input_shape {shape} is too small for the cnn (needs size >= 9)")
        layers.append((f"conv{i}", conv(in_channels if i == 1 else c, c, kernel, stride=stride)))
        if rank == 2:  # image inputs: GroupNorm after each conv (never BatchNorm)
            layers.append((f"norm{i}", nn.GroupNorm(8, c)))
        layers.append((f"relu{i}", nn.ReLU()))
    layers.append(("flatten", nn.Flatten()))
    layers.append(("head", nn.Linear(c * math.prod(spatial), outputs)))
    return nn.Sequential(OrderedDict(layers))


def _norm_factory(norm: str) -> Callable[[int], nn.Module]:
    if norm == "layer":  # LayerNorm over (C, H, W), as the paper did for per-example SAM
        return lambda c: nn.GroupNorm(1, c)
    if norm == "group":
        return lambda c: nn.GroupNorm(min(32, c), c)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with normalization and a shortcut.

    Parameters
    ----------
    conv : type
        ``nn.Conv1d`` or ``nn.Conv2d``.
    in_channels, out_channels, stride : int
        As in the CIFAR ResNet; a strided 1x1 convolution (+ norm) is the shortcut when the
        shape changes.
    norm : callable
        ``channels -> nn.Module`` normalization layer factory.
    """

    def __init__(
        self,
        conv: type[nn.Module],
        in_channels: int,
        out_channels: int,
        stride: int,
        norm: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = conv(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.norm2 = norm(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                conv(in_channels, out_channels, 1, stride=stride, bias=False), norm(out_channels)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (3x3 stem, no max-pool) with GroupNorm instead of BatchNorm.

    Four stages of two :class:`BasicBlock` (64, 128, 256, 512 channels), global average pool and
    a final ``nn.Linear(512, num_outputs)`` called ``head``. Image inputs ``[C, H, W]`` use 2-D
    convolutions; 1-D inputs ``[L]`` or ``[C, L]`` (e.g. MNIST-1D) use the same network with
    1-D convolutions.

    Parameters
    ----------
    input_shape : tuple of int
        Shape of one input.
    num_outputs : int
        Number of logits.
    norm : {"layer", "group"}
        ``"layer"``: ``nn.GroupNorm(1, c)`` (LayerNorm over channels and positions, the paper's
        choice); ``"group"``: ``nn.GroupNorm(32, c)``.
    """

    def __init__(self, input_shape: Sequence[int], num_outputs: int, norm: str = "layer") -> None:
        super().__init__()
        shape = _shape(input_shape)
        make_norm = _norm_factory(norm)
        prefix, in_channels, rank = _conv_input(shape)
        conv = nn.Conv1d if rank == 1 else nn.Conv2d
        self.reshape = prefix[0][1] if prefix else nn.Identity()
        self.stem = nn.Sequential(
            OrderedDict(
                [
                    ("conv", conv(in_channels, 64, 3, stride=1, padding=1, bias=False)),
                    ("norm", make_norm(64)),
                    ("relu", nn.ReLU()),
                ]
            )
        )
        stages = []
        channels = 64
        for width, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            stages.append(
                nn.Sequential(
                    BasicBlock(conv, channels, width, stride, make_norm),
                    BasicBlock(conv, width, width, 1, make_norm),
                )
            )
            channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool1d(1) if rank == 1 else nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(512, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.reshape(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(self.flatten(self.pool(x)))


def _build(
    name: str,
    shape: tuple[int, ...],
    outputs: int,
    width: int,
    norm: str,
) -> nn.Module:
    if name == "linear":
        return _linear(shape, outputs)
    if name == "mlp":
        return _mlp(shape, outputs, width)
    if name == "cnn":
        return _cnn(shape, outputs)
    if name == "resnet18":
        return ResNet18(shape, outputs, norm=norm)
    return _two_layer_linear(shape, outputs, width)


def build_model(
    name: str,
    input_shape: int | Sequence[int],
    num_classes: int,
    *,
    width: int = 256,
    seed: int | None = None,
    binary_head: bool = False,
    norm: str = "layer",
) -> nn.Module:
    """Build one of the zoo's models.

    Parameters
    ----------
    name : {"linear", "mlp", "cnn", "resnet18", "two_layer_linear"}
        ``"linear"``: Flatten -> Linear(d, C). ``"mlp"``: Flatten -> Linear(d, width) ReLU
        Linear(width, width) ReLU Linear(width, C). ``"cnn"``: Conv(1->32, k5) ReLU
        Conv(32->32, k3, s2) ReLU Conv(32->32, k3, s2) ReLU Flatten Linear(->C); 1-D
        convolutions without normalization for vector inputs (MNIST-1D), 2-D convolutions with
        ``GroupNorm(8, 32)`` after each for images. ``"resnet18"``: :class:`ResNet18`.
        ``"two_layer_linear"``: Flatten -> Linear(d, width, bias=False) ->
        Linear(width, C, bias=False), no nonlinearity (SPEC section 2.5).
    input_shape : int or tuple of int
        Shape of one input without the batch dimension: ``(d,)``, ``(C, L)`` or ``(C, H, W)``.
    num_classes : int
        Number of classes (at least 2).
    width : int
        Hidden width of ``"mlp"`` and ``"two_layer_linear"``; the other models ignore it.
    seed : int, optional
        Initialize under ``torch.random.fork_rng`` seeded with it: the same seed gives the same
        weights and the global torch RNG is left untouched. ``None`` draws from the global RNG.
    binary_head : bool
        With ``num_classes == 2``, end in a single logit (for the binary logistic loss).
    norm : {"layer", "group"}
        Normalization of ``"resnet18"`` (see :class:`ResNet18`); the other models ignore it.

    Returns
    -------
    torch.nn.Module
        A float32 model on the CPU whose last layer, ``model.head``, is an ``nn.Linear`` with
        ``num_classes`` outputs (1 with ``binary_head``).

    Examples
    --------
    >>> import torch
    >>> model = build_model("two_layer_linear", (20,), 2, width=16, binary_head=True, seed=0)
    >>> model(torch.zeros(4, 20)).shape
    torch.Size([4, 1])
    >>> model = build_model("cnn", (3, 32, 32), 10, seed=0)
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    shape = _shape(input_shape)
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if binary_head and num_classes != 2:
        raise ValueError(f"binary_head=True needs num_classes == 2, got {num_classes}")
    if int(width) != width or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    _norm_factory(norm)  # validate early, whatever the model
    outputs = 1 if binary_head else int(num_classes)

    if seed is None:
        return _build(name, shape, outputs, int(width), norm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(name, shape, outputs, int(width), norm)

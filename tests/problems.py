"""Test problems declared as data (BackPACK style): a model factory, an input factory, classes.

Adding an architecture to every correctness test is one entry in ``PROBLEMS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.lin(self.norm(x)))


class ResNetLN(nn.Module):
    """A small residual net with LayerNorm whose head is not called ``fc``."""

    def __init__(self, d_in=6, d=8, c=4):
        super().__init__()
        self.stem = nn.Linear(d_in, d)
        self.blocks = nn.Sequential(ResBlock(d), ResBlock(d))
        self.classifier = nn.Linear(d, c)

    def forward(self, x):
        return self.classifier(self.blocks(self.stem(x)))


class Scale(nn.Module):
    """A custom module with its own parameter (exercises the torch.func fallback)."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.gain


class SeqModel(nn.Module):
    """Embedding, 3-D Linear inputs, a Linear used twice, LayerNorm, a custom parameter."""

    def __init__(self, vocab=11, d=6, c=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.mix = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.scale = Scale(d)
        self.out = nn.Linear(d, c)

    def forward(self, idx):
        h = self.emb(idx)
        h = h + torch.tanh(self.mix(self.norm(h)))
        h = self.mix(h)  # second call of the same module
        return self.out(self.scale(h).mean(1))


class TiedModel(nn.Module):
    """Input and output embeddings tied (a parameter shared by two modules)."""

    def __init__(self, vocab=7, d=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.hidden = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.hidden(self.emb(idx).mean(1))))


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 4))


def cnn2d():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, stride=2, groups=2), nn.Flatten(),
                         nn.Linear(6 * 3 * 3, 3))


def cnn1d():
    return nn.Sequential(nn.Unflatten(1, (1, 20)),
                         nn.Conv1d(1, 4, 5, padding="same", padding_mode="circular"), nn.ReLU(),
                         nn.Conv1d(4, 4, 3, stride=2, dilation=2), nn.Flatten(),
                         nn.LayerNorm(32), nn.Linear(32, 3))


def frozen():
    net = mlp()
    net[0].weight.requires_grad_(False)
    net[2].requires_grad_(False)
    return net


def binary():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))


def custom():
    return nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), nn.Linear(5, 3))


@dataclass
class Problem:
    name: str
    model: Callable[[], nn.Module]
    inputs: Callable[[int], torch.Tensor]
    num_classes: int  # 2 with a single logit = binary head
    binary: bool = False


def _randn(*shape):
    return lambda b: torch.randn(b, *shape)


PROBLEMS = [
    Problem("mlp", mlp, _randn(6), 4),
    Problem("cnn2d", cnn2d, _randn(2, 8, 8), 3),
    Problem("cnn1d", cnn1d, _randn(20), 3),
    Problem("resnet_ln", ResNetLN, _randn(6), 4),
    Problem("frozen", frozen, _randn(6), 4),
    Problem("binary", binary, _randn(5), 2, binary=True),
    Problem("custom_param", custom, _randn(4), 3),
    Problem("sequence", SeqModel, lambda b: torch.randint(0, 11, (b, 7)), 3),
    Problem("tied", TiedModel, lambda b: torch.randint(0, 7, (b, 3)), 7),
]


def make(problem: Problem, batch: int = 5, seed: int = 0):
    """Model, inputs and targets of a problem, in float64."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = problem.model().double()
        x = problem.inputs(batch)
    if x.is_floating_point():
        x = x.double()
    y = torch.randint(0, problem.num_classes, (batch,), generator=g)
    return model, x, y

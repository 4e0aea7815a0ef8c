"""The benchmark models and their data, declared as data (name -> factory, input, batch).

* ``mlp``: MLP 784-512-512-10, batch 256;
* ``cnn``: conv3x3 32-64-128 with GroupNorm(8) and ReLU on 3×32×32, stride-2 downsampling,
  global average pool, Linear to 10, batch 128;
* ``transformer``: pre-norm transformer classifier on token sequences (vocab 1000, length 32,
  width 64, 4 heads, 2 blocks, attention from ``nn.Linear`` q/k/v/o), mean-pool, Linear head,
  batch 64.

Every model ends in an ``nn.Linear`` called ``head``; no BatchNorm, no dropout.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["CONFIGS", "Config", "make_cnn", "make_mlp", "make_transformer"]

NUM_CLASSES = 10


def make_mlp(width: int = 512, inputs: int = 784) -> nn.Module:
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(inputs, width)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(width, width)), ("relu2", nn.ReLU()),
        ("head", nn.Linear(width, NUM_CLASSES)),
    ]))


def make_cnn(channels: tuple[int, ...] = (32, 64, 128)) -> nn.Module:
    layers: list[tuple[str, nn.Module]] = []
    c_in = 3
    for i, c in enumerate(channels, start=1):
        layers += [
            (f"conv{i}", nn.Conv2d(c_in, c, 3, stride=1 if i == 1 else 2, padding=1)),
            (f"norm{i}", nn.GroupNorm(8, c)),
            (f"relu{i}", nn.ReLU()),
        ]
        c_in = c
    layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
               ("head", nn.Linear(c_in, NUM_CLASSES))]
    return nn.Sequential(OrderedDict(layers))


class SelfAttention(nn.Module):
    """Multi-head self-attention from four ``nn.Linear`` layers (no fused kernels)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        B, S, d = x.shape
        h = self.heads

        def split(t):
            return t.reshape(B, S, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(B, S, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), SelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    """Token + position embeddings, pre-norm blocks, final LayerNorm, mean-pool, Linear head."""

    def __init__(self, vocab: int = 1000, seq: int = 32, d: int = 64, heads: int = 4,
                 depth: int = 2):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(depth)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, NUM_CLASSES)

    def forward(self, idx: Tensor) -> Tensor:
        B, S = idx.shape
        # positions as a [B, S] index tensor so every module call has the batch dimension first
        # (materialized, not expanded: Opacus' embedding norm sampler needs a viewable tensor)
        pos = torch.arange(S, device=idx.device).repeat(B, 1)
        x = self.blocks(self.tok(idx) + self.pos(pos))
        return self.head(self.ln(x).mean(1))


def make_transformer() -> nn.Module:
    return Transformer()


@dataclass(frozen=True)
class Config:
    """A benchmark problem: model factory, input factory and batch size."""

    name: str
    description: str
    batch: int

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return {"mlp": make_mlp, "cnn": make_cnn, "transformer": make_transformer}[self.name]()

    def data(self, batch: int | None = None, seed: int = 1) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed)
        n = batch or self.batch
        if self.name == "mlp":
            x = torch.randn(n, 784, generator=g)
        elif self.name == "cnn":
            x = torch.randn(n, 3, 32, 32, generator=g)
        else:
            x = torch.randint(0, 1000, (n, 32), generator=g)
        return x, torch.randint(0, NUM_CLASSES, (n,), generator=g)


CONFIGS: dict[str, Config] = {
    "mlp": Config("mlp", "MLP 784-512-512-10", 256),
    "cnn": Config("cnn", "CNN 32-64-128 + GroupNorm, 3×32×32", 128),
    "transformer": Config("transformer", "Transformer 2×(d 64, 4 heads), seq 32", 64),
}

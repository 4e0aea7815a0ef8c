"""Model classes of the zoo (issue 9): the ways real models use their parameters.

Every family here broke the library once (silently wrong numbers or a raw torch error). The
entries that use them are declared as data in ``tests/problems.py`` (``ZOO``).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

# --------------------------------------------------------------------------- tied weights


class GPTTied(nn.Module):
    """GPT-style tied output head used functionally: ``F.linear(h, self.emb.weight)``."""

    def __init__(self, vocab=7, length=4, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(length, d)
        self.block = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
        h = self.emb(idx) + self.pos(pos)
        h = self.norm(h + torch.tanh(self.block(h)))
        return F.linear(h.mean(1), self.emb.weight)


# --------------------------------------------------------------------------- derived weights


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return fn(*args, **kwargs)


def wn_legacy_hidden():
    return nn.Sequential(_quiet(nn.utils.weight_norm, nn.Linear(5, 7)), nn.Tanh(),
                         nn.Linear(7, 3))


def wn_legacy_head():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(),
                         _quiet(nn.utils.weight_norm, nn.Linear(7, 3)))


def wn_param_hidden():
    return nn.Sequential(parametrizations.weight_norm(nn.Linear(5, 7)), nn.Tanh(),
                         nn.Linear(7, 3))


def wn_param_head():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(),
                         parametrizations.weight_norm(nn.Linear(7, 3)))


def spectral_hidden():
    # measured in eval mode: the power-iteration buffers u, v are then fixed (deterministic)
    return nn.Sequential(parametrizations.spectral_norm(nn.Linear(5, 7)), nn.Tanh(),
                         nn.Linear(7, 3))


def spectral_head():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(),
                         parametrizations.spectral_norm(nn.Linear(7, 3)))


# --------------------------------------------------------------------------- root-owned parameters


class Temperature(nn.Module):
    """A learned temperature (owned by the root) multiplying the head's logits."""

    def __init__(self, d_in=5, d=6, c=3):
        super().__init__()
        self.body = nn.Linear(d_in, d)
        self.head = nn.Linear(d, c)
        self.temp = nn.Parameter(torch.tensor([1.3]))

    def forward(self, x):
        return self.head(torch.tanh(self.body(x))) * self.temp


class RootPositional(nn.Module):
    """A learned positional embedding owned by the root, added in the root's forward."""

    def __init__(self, vocab=9, length=4, d=6, c=3):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.5 * torch.randn(length, d))
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, c)

    def forward(self, idx):
        h = self.tok(idx) + self.pos[: idx.shape[1]]
        h = torch.tanh(self.mix(h))
        return self.head(h.mean(1))


class RootMatmulHead(nn.Module):
    """No nn.Linear at all: a custom matmul head ``h @ self.W`` owned by the root."""

    def __init__(self, vocab=9, d=6, c=4):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.W = nn.Parameter(0.5 * torch.randn(d, c))

    def forward(self, idx):
        return self.norm(self.tok(idx).mean(1)) @ self.W


class ParamHead(nn.Module):
    def __init__(self, d, c):
        super().__init__()
        self.weight = nn.Parameter(0.4 * torch.randn(c, d))
        self.bias = nn.Parameter(0.1 * torch.randn(c))

    def forward(self, h):
        return h @ self.weight.T + self.bias


class LinearThenParamHead(nn.Module):
    """A custom Parameter head after a backbone nn.Linear: the last nn.Linear is NOT the head.

    The backbone's last Linear has as many outputs as there are classes, so a head finder that
    only compares output sizes cannot tell.
    """

    def __init__(self, d_in=4, d=6, c=3):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.body = nn.Linear(d, c)
        self.head = ParamHead(c, c)

    def forward(self, x):
        return self.head(torch.tanh(self.body(torch.tanh(self.inp(x)))))


class Gain0(nn.Module):
    """A 0-dim Parameter."""

    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(0.8))

    def forward(self, x):
        return x * self.g


def zero_dim_binary():
    return nn.Sequential(nn.Linear(5, 6), Gain0(), nn.Tanh(), nn.Linear(6, 1))


# --------------------------------------------------------------------------- recurrent


class RecurrentClassifier(nn.Module):
    """nn.RNN / nn.GRU / nn.LSTM over float sequences [B, T, F] (batch_first or not)."""

    def __init__(self, kind="lstm", batch_first=True, d_in=3, d=5, c=3, pool="last"):
        super().__init__()
        cls = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[kind]
        self.batch_first = batch_first
        self.pool = pool
        self.rnn = cls(d_in, d, batch_first=batch_first)
        self.fc = nn.Linear(d, c)

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)  # [T, B, F]
        out, _ = self.rnn(x)
        if not self.batch_first:
            out = out.transpose(0, 1)
        h = out[:, -1] if self.pool == "last" else out.mean(1)
        return self.fc(h)


# --------------------------------------------------------------------------- attention


class TransformerClassifier(nn.Module):
    """Embedding + learned positional embedding (root) + TransformerEncoderLayer + mean + head."""

    def __init__(self, vocab=9, length=4, d=8, heads=2, c=3):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.3 * torch.randn(length, d))
        self.enc = nn.TransformerEncoderLayer(d, heads, dim_feedforward=12, dropout=0.1,
                                              batch_first=True)
        self.head = nn.Linear(d, c)

    def forward(self, idx):
        h = self.enc(self.tok(idx) + self.pos[: idx.shape[1]])
        return self.head(h.mean(1))


class MHAClassifier(nn.Module):
    def __init__(self, d_in=3, d=8, heads=2, c=4, add_bias_kv=False):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True, add_bias_kv=add_bias_kv)
        self.head = nn.Linear(d, c)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((h + a).mean(1))


# --------------------------------------------------------------------------- subclassed layers


class LoRALinear(nn.Linear):
    """nn.Linear subclass overriding forward: W x + b + B A x."""

    def __init__(self, d_in, d_out, r=2):
        super().__init__(d_in, d_out)
        self.lora_A = nn.Parameter(0.3 * torch.randn(r, d_in))
        self.lora_B = nn.Parameter(0.3 * torch.randn(d_out, r))

    def forward(self, x):
        return super().forward(x) + x @ self.lora_A.T @ self.lora_B.T


def lora():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), LoRALinear(6, 6), nn.Tanh(),
                         nn.Linear(6, 3))


class WSConv2d(nn.Conv2d):
    """Weight-standardized Conv2d: the conv uses (W - mean) / std of the raw weight."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True) + 1e-5
        return F.conv2d(x, (w - mean) / std, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


def ws_conv():
    return nn.Sequential(WSConv2d(2, 3, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(3 * 2 * 2, 3))


# --------------------------------------------------------------------------- sequence-first, L == B


class SeqFirst(nn.Module):
    """Embedding / LayerNorm / Linear run on [L, B, ...] (tutorial layout), batch-first head."""

    def __init__(self, vocab=9, d=6, c=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, c)

    def forward(self, idx):  # idx [B, L]
        h = self.emb(idx.t())  # [L, B, d]
        h = torch.tanh(self.mix(self.norm(h)))
        return self.head(h.transpose(0, 1).mean(1))


class SeqFirstMHA(nn.Module):
    """nn.MultiheadAttention(batch_first=False) on [L, B, d], then a batch-first head."""

    def __init__(self, d_in=3, d=6, heads=2, c=3):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.attn = nn.MultiheadAttention(d, heads)
        self.head = nn.Linear(d, c)

    def forward(self, x):  # x [B, L, F]
        h = torch.tanh(self.inp(x)).transpose(0, 1)  # [L, B, d]
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((h + a).transpose(0, 1).mean(1))


# --------------------------------------------------------------------------- in-place / randomness


class MaxNormEmbedding(nn.Module):
    """Embedding(max_norm=...): F.embedding renormalizes rows of the weight IN PLACE.

    Rows start well inside the ball (norm <= 0.7 max_norm) so that at w and w + ε (ρ small) the
    renormalization is a numerical no-op; the in-place call itself is what is exercised.
    """

    def __init__(self, vocab=9, d=5, c=3, max_norm=1.5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, max_norm=max_norm)
        with torch.no_grad():
            w = self.emb.weight
            w.mul_(0.7 * max_norm / w.norm(dim=1, keepdim=True).clamp_min(1e-12))
            w.mul_(torch.linspace(0.5, 1.0, vocab)[:, None])
        self.head = nn.Linear(d, c)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx).mean(1)))


class DropBlock(nn.Module):
    """A custom module with Dropout inside (train mode: random; eval mode: identity)."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.drop = nn.Dropout(0.3)
        self.gain = nn.Parameter(torch.linspace(0.7, 1.2, d))

    def forward(self, x):
        return torch.tanh(self.drop(self.lin(x)) * self.gain)


def dropout_custom():
    return nn.Sequential(nn.Linear(4, 6), DropBlock(6), nn.Linear(6, 3))

"""Test problems declared as data (BackPACK style): a model factory, an input factory, classes.

Adding an architecture to every correctness test is one entry in ``PROBLEMS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import zoo_models as zm
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


LAST_LINEAR = "<last nn.Linear>"


@dataclass
class Problem:
    """One model family. The zoo fields (after ``binary``) have defaults that fit ``PROBLEMS``.

    ``head``: name of the module whose input is the head input (the penultimate activation and
    the layer of ``last_layer_weight_norm``); ``LAST_LINEAR`` = the last ``nn.Linear`` in
    ``named_modules()``; ``None`` = no module is the head (a functional / Parameter head), so
    ``Probe`` must refuse to guess one. ``batch``: the zoo's batch size. ``train``: the family
    also runs a SAM step in train mode (randomness). ``allowed_refusal``: calls (see
    ``tests/test_zoo.py``) where a clear library error is the honest answer — keep it small.
    """

    name: str
    model: Callable[[], nn.Module]
    inputs: Callable[[int], torch.Tensor]
    num_classes: int  # 2 with a single logit = binary head
    binary: bool = False
    head: str | None = LAST_LINEAR
    batch: int = 5
    train: bool = False
    allowed_refusal: frozenset = frozenset()


def _every_call() -> frozenset:
    ms = ("m1", "m3", "mNone")
    calls = {f"{f}-{m}" for f in ("jacobian_norms", "grad_norms")
             for m in ("auto", "fast", "exact")}
    calls |= {f"probe-{h}-{m}" for h in ("auto", "given") for m in ms}
    calls |= {f"sam-{v}-{m}" for v in ("sam", "lsam", "jsam") for m in ms}
    return frozenset(calls)


EVERY_CALL = _every_call()


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


def _tokens(vocab, length):
    return lambda b: torch.randint(0, vocab, (b, length))


# The zoo of issue 9: every way of using parameters that once made the library wrong or crash.
# All families are measured in eval mode in float64 against tests/reference.py.
ZOO_ONLY = [
    Problem("gpt_tied_functional", zm.GPTTied, _tokens(7, 4), 7, head=None),
    Problem("wn_legacy_hidden", zm.wn_legacy_hidden, _randn(5), 3),
    Problem("wn_legacy_head", zm.wn_legacy_head, _randn(5), 3),
    Problem("wn_param_hidden", zm.wn_param_hidden, _randn(5), 3),
    Problem("wn_param_head", zm.wn_param_head, _randn(5), 3),
    Problem("spectral_hidden", zm.spectral_hidden, _randn(5), 3),
    Problem("spectral_head", zm.spectral_head, _randn(5), 3),
    # a temperature follows the last nn.Linear: it is not the head z = V a + b (issue 9, item 5)
    Problem("root_temperature", zm.Temperature, _randn(5), 3, head=None),
    Problem("root_positional", zm.RootPositional, _tokens(9, 4), 3, head="head"),
    Problem("root_matmul_head", zm.RootMatmulHead, _tokens(9, 3), 4, head=None),
    Problem("param_head_after_linear", zm.LinearThenParamHead, _randn(4), 3, head=None),
    Problem("zero_dim_binary", zm.zero_dim_binary, _randn(5), 2, binary=True),
    Problem("rnn_batch_first", lambda: zm.RecurrentClassifier("rnn", True), _randn(4, 3), 3),
    Problem("rnn_seq_first", lambda: zm.RecurrentClassifier("rnn", False, pool="mean"),
            _randn(4, 3), 3),
    Problem("gru_batch_first", lambda: zm.RecurrentClassifier("gru", True, pool="mean"),
            _randn(4, 3), 3),
    Problem("gru_seq_first", lambda: zm.RecurrentClassifier("gru", False), _randn(4, 3), 3),
    Problem("lstm_batch_first", lambda: zm.RecurrentClassifier("lstm", True), _randn(4, 3), 3),
    Problem("lstm_seq_first", lambda: zm.RecurrentClassifier("lstm", False, pool="mean"),
            _randn(4, 3), 3),
    Problem("transformer_encoder", zm.TransformerClassifier, _tokens(9, 4), 3, head="head"),
    Problem("mha", zm.MHAClassifier, _randn(4, 3), 4, head="head"),
    Problem("mha_bias_kv", lambda: zm.MHAClassifier(add_bias_kv=True), _randn(4, 3), 4,
            head="head"),
    Problem("lora_subclass", zm.lora, _randn(4), 3),
    Problem("ws_conv_subclass", zm.ws_conv, _randn(2, 4, 4), 3),
    # sequence-first layers with L == B == 5: the batch axis cannot be guessed from sizes
    Problem("seq_first_L_eq_B", zm.SeqFirst, _tokens(9, 5), 3, head="head", batch=5),
    Problem("seq_first_mha_L_eq_B", zm.SeqFirstMHA, _randn(5, 3), 3, head="head", batch=5),
    # max_norm rewrites the weight in place inside forward: measuring would change the model,
    # so every call refuses (naming the way out) instead of returning a number
    Problem("embedding_max_norm", zm.MaxNormEmbedding, _tokens(9, 3), 3, head="head",
            allowed_refusal=EVERY_CALL),
    Problem("dropout_custom", zm.dropout_custom, _randn(4), 3, train=True),
]
# every existing problem is in the zoo too (TiedModel: attribute tying head.weight = emb.weight)
ZOO = PROBLEMS + ZOO_ONLY


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

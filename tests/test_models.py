"""Tests of sam_diagnostics.models: shapes, final layer, normalization, seeding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sam_diagnostics.models import MODELS, build_model

# input shapes of the data sets: digits, mnist1d, gaussian, cifar10
SHAPES = [(64,), (40,), (20,), (3, 32, 32)]


def _last_parametrized_module(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))][-1]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODELS)
def test_every_model_builds_and_runs(name, shape):
    model = build_model(name, shape, 10, width=32, seed=0)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 10) and out.dtype == torch.float32
    last = _last_parametrized_module(model)
    assert isinstance(last, nn.Linear) and last is model.head and last.out_features == 10
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(not getattr(m, "inplace", False) for m in model.modules())


@pytest.mark.parametrize("name", MODELS)
def test_binary_head_ends_in_one_logit(name):
    model = build_model(name, (20,), 2, width=16, binary_head=True, seed=0)
    assert model(torch.randn(4, 20)).shape == (4, 1)
    assert model.head.out_features == 1
    assert build_model(name, (20,), 2, width=16, seed=0)(torch.randn(4, 20)).shape == (4, 2)


@pytest.mark.parametrize("name", MODELS)
def test_seed_reproducible_and_global_rng_untouched(name):
    state = torch.get_rng_state()
    a = build_model(name, (40,), 10, width=16, seed=7)
    b = build_model(name, (40,), 10, width=16, seed=7)
    c = build_model(name, (40,), 10, width=16, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_seed_none_uses_the_global_rng():
    torch.manual_seed(0)
    a = build_model("mlp", (40,), 10)
    torch.manual_seed(0)
    b = build_model("mlp", (40,), 10)
    assert torch.equal(a.head.weight, b.head.weight)


def test_mlp_architecture():
    model = build_model("mlp", (40,), 10, seed=0)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(40, 256), (256, 256), (256, 10)]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 2


def test_cnn_1d_architecture_has_no_normalization():
    model = build_model("cnn", (40,), 10, seed=0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (1, 32, 5, 1),
        (32, 32, 3, 2),
        (32, 32, 3, 2),
    ]
    assert not any(isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for m in model.modules())
    assert model.head.in_features == 32 * 8  # 40 -> 36 -> 17 -> 8


def test_cnn_image_uses_groupnorm():
    model = build_model("cnn", (3, 32, 32), 10, seed=0)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and all((n.num_groups, n.num_channels) == (8, 32) for n in norms)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 3


@pytest.mark.parametrize("norm, groups", [("layer", 1), ("group", 32)])
def test_resnet18_structure(norm, groups):
    model = build_model("resnet18", (3, 32, 32), 10, seed=0, norm=norm)
    stem = model.stem.conv
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, (nn.MaxPool2d, nn.MaxPool1d)) for m in model.modules())
    widths = [
        stage[-1].conv2.out_channels
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
    ]
    assert widths == [64, 128, 256, 512]
    assert all(
        len(stage) == 2 for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
    )
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(n.num_groups == min(groups, n.num_channels) for n in norms)
    assert (model.head.in_features, model.head.out_features) == (512, 10)
    assert 11.0e6 < sum(p.numel() for p in model.parameters()) < 11.3e6


def test_no_module_is_called_twice():
    """Per-example rules need every module called once per forward (no shared ReLU)."""
    model = build_model("resnet18", (40,), 10, seed=0)
    calls: dict[str, int] = {}
    handles = [
        m.register_forward_hook(
            lambda mod, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)
        )
        for name, m in model.named_modules()
        if name
    ]
    model(torch.randn(2, 40))
    for h in handles:
        h.remove()
    assert calls and set(calls.values()) == {1}


def test_two_layer_linear_is_bias_free_and_linear():
    model = build_model("two_layer_linear", (20,), 3, width=8, seed=0)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(20, 8), (8, 3)]
    assert all(m.bias is None for m in linears)
    x, y = torch.randn(5, 20, dtype=torch.float64), torch.randn(5, 20, dtype=torch.float64)
    model = model.double()
    torch.testing.assert_close(model(2 * x - 3 * y), 2 * model(x) - 3 * model(y))
    torch.testing.assert_close(model(x), x @ linears[0].weight.T @ linears[1].weight.T)


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_parameter(name):
    model = build_model(name, (3, 16, 16), 10, width=16, seed=0)
    nn.functional.cross_entropy(model(torch.randn(2, 3, 16, 16)), torch.tensor([1, 2])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_errors():
    with pytest.raises(ValueError, match="linear.*mlp.*cnn.*resnet18.*two_layer_linear"):
        build_model("vgg", (40,), 10)
    with pytest.raises(ValueError, match="binary_head"):
        build_model("mlp", (40,), 10, binary_head=True)
    with pytest.raises(ValueError, match="input_shape"):
        build_model("mlp", (1, 2, 3, 4), 10)
    with pytest.raises(ValueError, match="too small"):
        build_model("cnn", (6,), 10)
    with pytest.raises(ValueError, match="norm"):
        build_model("resnet18", (40,), 10, norm="batch")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("linear", (40,), 1)

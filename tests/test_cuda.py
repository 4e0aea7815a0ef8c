"""On a CUDA GPU the engine gives the CPU float64 reference to the dtype's tolerance (skipped
without CUDA; ``bash sd_benchmarks/gpu.sh`` runs these on a GPU machine)."""

import copy

import pytest
import torch
from problems import ZOO, make

import sam_diagnostics as sd

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NAMES = ["mlp", "cnn2d", "resnet_ln", "sequence", "gpt_tied_functional", "lstm_seq_first",
         "transformer_encoder", "binary"]
BY_NAME = {p.name: p for p in ZOO}


@pytest.fixture(autouse=True)
def full_float32():
    """Compare float32 with float32 arithmetic: TF32 (cuDNN's default for convolutions) rounds
    inputs to 10 mantissa bits."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def on_gpu(name, dtype=torch.float32):
    model, x, y = make(BY_NAME[name], batch=6)
    gpu = copy.deepcopy(model).to("cuda", dtype)
    xg = x.to("cuda", dtype) if x.is_floating_point() else x.cuda()
    return model.double().cpu(), x, y, gpu, xg, y.cuda()


def close(gpu, cpu, rtol):
    torch.testing.assert_close(gpu.detach().double().cpu(), cpu.double(), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("name", NAMES)
def test_norms_on_gpu_equal_the_cpu_float64_reference(name):
    cpu, x, y, gpu, xg, yg = on_gpu(name)
    ref_j = sd.jacobian_norms(cpu, x, "exact")
    ref_g = sd.grad_norms(cpu, x, y, "exact")
    close(sd.jacobian_norms(gpu, xg), ref_j, 1e-4)
    close(sd.grad_norms(gpu, xg, yg), ref_g, 1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_probe_and_one_sam_step_on_gpu(name):
    cpu, x, y, gpu, xg, yg = on_gpu(name)
    head = {} if BY_NAME[name].head is not None else {"head": None}
    if head:
        pytest.skip("no module is this model's head")
    ref = sd.Probe(cpu, method="exact").measure(x, y, rho=0.05)
    got = sd.Probe(gpu).measure(xg, yg, rho=0.05)
    for v in ("loss", "logit_scale", "jacobian_norm", "grad_norm", "activation_norm"):
        close(torch.from_numpy(got[v].values), torch.from_numpy(ref[v].values), 2e-4)
    w = {n: p.detach().clone() for n, p in cpu.named_parameters()}
    sd.SAM(cpu, torch.optim.SGD(cpu.parameters(), lr=0.1), 0.05, 1).step(x, y)
    sd.SAM(gpu, torch.optim.SGD(gpu.parameters(), lr=0.1), 0.05, 1).step(xg, yg)
    for (n, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        close(q - w[n].to(q), p - w[n], 2e-2)  # float32 ε_i directions vs float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norms_accumulate_in_float32_under_autocast(dtype):
    cpu, x, _, gpu, xg, _ = on_gpu("mlp")
    ref = sd.jacobian_norms(cpu, x, "exact")
    with torch.autocast("cuda", dtype=dtype):
        got = sd.jacobian_norms(gpu, xg)
    assert got.dtype == torch.float32
    close(got, ref, 3e-2)

"""The real CUDA path (marked gpu: skipped without CUDA). Run on an H100/H200 with
`pytest -m gpu tests/test_gpu.py`."""

import copy

import pytest
import torch
import torch.nn as nn

import fp8train
from fp8train import Float8LinearConfig
from _helpers import sqnr

pytestmark = pytest.mark.gpu


def _needs_fp8():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a GPU with fp8 tensor cores (sm_89+)")


@pytest.mark.parametrize("recipe", fp8train.recipe_names())
def test_cuda_three_gemms_vs_fp32(recipe):
    _needs_fp8()
    torch.manual_seed(0)
    ref = nn.Linear(1024, 2048, device="cuda")
    f8 = fp8train.convert_to_float8_training(copy.deepcopy(ref), config=recipe, auto_filter=False)
    x = torch.randn(4, 512, 1024, device="cuda")
    go = torch.randn(4, 512, 2048, device="cuda")
    if f8.config.has_delayed:
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                f8(x).backward(go)
            fp8train.sync_float8_amax_and_scale_history(f8)
        f8.zero_grad()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = f8(xa)
    y.backward(go.to(y.dtype))
    yr = ref(xb)
    yr.backward(go)
    # bf16 outputs + fp8 operands; the CPU suite measured 28.5 dB per e4m3 GEMM, 24.6 for e5m2 grads.
    # mxfp8: nn.Linear(1024, ...)'s uniform(-2**-5, 2**-5) weights lose ~9% of their elements to the
    # OCP scale rule's clamp, so the GEMMs with the weight do worse: measured on CPU (M=256, bf16
    # autocast) 24.8 / 24.8 / 27.6 dB
    out, gi, gw = {"delayed": (25.0, 22.0, 22.0), "mxfp8": (22.5, 22.5, 25.0)}.get(recipe, (25.0, 25.0, 25.0))
    assert sqnr(y, yr) > out
    assert sqnr(xa.grad, xb.grad) > gi
    assert sqnr(f8.weight.grad, ref.weight.grad) > gw


@pytest.mark.parametrize("recipe", fp8train.recipe_names())
def test_cuda_real_matches_emulated(recipe):
    _needs_fp8()
    torch.manual_seed(0)
    base = nn.Linear(512, 256, device="cuda", dtype=torch.bfloat16)
    real = fp8train.convert_to_float8_training(copy.deepcopy(base), config=recipe, auto_filter=False)
    emu = fp8train.convert_to_float8_training(
        copy.deepcopy(base), config=Float8LinearConfig.from_recipe_name(recipe, emulate=True))
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    assert sqnr(real(x), emu(x)) > 35


@pytest.mark.parametrize("pad", [False, True])
def test_cuda_odd_token_count(pad):
    _needs_fp8()
    f8 = fp8train.convert_to_float8_training(nn.Linear(256, 128, device="cuda"),
                                             config=Float8LinearConfig(pad_inner_dim=pad), auto_filter=False)
    x = torch.randn(3, 7, 256, device="cuda", requires_grad=True)  # M = 21 tokens
    with torch.autocast("cuda", dtype=torch.bfloat16):
        f8(x).sum().backward()
    assert torch.isfinite(f8.weight.grad).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("recipe", fp8train.recipe_names())
def test_cuda_compile_fullgraph(recipe):
    _needs_fp8()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512)).cuda()
    model = fp8train.convert_to_float8_training(model, config=recipe, auto_filter=False)
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(1024, 512, device="cuda")
    for _ in range(3):
        for m, mod in ((compiled, model), (eager, eager)):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                m(x).float().pow(2).mean().backward()
            fp8train.sync_float8_amax_and_scale_history(mod)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        # fp8 re-rounding of a few elements after inductor reorders fp32 math: measured 29.8 dB (rowwise)
        assert sqnr(compiled(x), eager(x)) > 25
    # rowwise was 16.4 dB here before amaxes were reduced in fp32 under compile (tensor_amax);
    # measured after the fix (H100, torch 2.11): 28.3 dB (layer 0) and 37.2 dB (layer 2)
    assert sqnr(model[0].weight.grad, eager[0].weight.grad) > 25
    assert sqnr(model[2].weight.grad, eager[2].weight.grad) > 25


def test_cuda_auto_filter_is_on_by_default():
    _needs_fp8()
    m = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 8192), nn.Linear(8192, 8192)).cuda()
    m = fp8train.convert_to_float8_training(m, config="tensorwise")
    report = fp8train.conversion_report(m)
    assert "auto filter" in report.skipped["0"] and "2" in report.converted


# --- mxfp8 on CUDA: emulated before Blackwell, native block-scaled _scaled_mm on sm_100+ -----------------
def test_cuda_mxfp8_matches_the_cpu_emulation():
    """The same MX quantization on both devices; only the GEMMs differ (fp32 emulated on Hopper,
    bf16-output native kernel on Blackwell)."""
    _needs_fp8()
    from fp8train.mx_ops import mx_runs_native

    torch.manual_seed(0)
    base = nn.Linear(512, 256)
    cfg = Float8LinearConfig.from_recipe_name("mxfp8")
    native = mx_runs_native(cfg, torch.device("cuda"))
    print(f"mxfp8 on {torch.cuda.get_device_name()}: {'native' if native else 'emulated'}")
    assert native == (torch.cuda.get_device_capability() >= (10, 0))
    cpu = fp8train.Float8Linear.from_float(copy.deepcopy(base), cfg)
    gpu = fp8train.Float8Linear.from_float(copy.deepcopy(base).cuda(), cfg)
    x = torch.randn(3, 37, 512)  # M = 111 tokens: the grad_weight GEMM's blocks are padded
    go = torch.randn(3, 37, 256)
    xc, xg = x.clone().requires_grad_(), x.cuda().requires_grad_()
    yc, yg = cpu(xc), gpu(xg)
    yc.backward(go)
    yg.backward(go.cuda())
    # emulated: fp32 GEMMs on the same operands (the CPU suite measured > 140 dB against the
    # from-the-spec reference); native: results rounded to bf16 (~55 dB with a stand-in kernel)
    bound = 45.0 if native else 100.0
    assert sqnr(yg.cpu(), yc) > bound
    assert sqnr(xg.grad.cpu(), xc.grad) > bound
    assert sqnr(gpu.weight.grad.cpu(), cpu.weight.grad) > bound


def test_cuda_mxfp8_autocast_nd_bias_and_training_steps():
    _needs_fp8()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).cuda()
    for lin in (model[0], model[2]):  # Gaussian weights, as in fp8train's Llama
        nn.init.normal_(lin.weight, std=lin.in_features**-0.5)
    ref = copy.deepcopy(model)
    fp8train.convert_to_float8_training(model, config="mxfp8", auto_filter=False)
    compiled = torch.compile(model, fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(4, 129, 256, device="cuda")  # M = 516: not a multiple of 32
    target = torch.randn(4, 129, 256, device="cuda")
    losses = []
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (compiled(x).float() - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        y = compiled(x)
    assert y.dtype == torch.bfloat16
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (ref(x).float() - target).pow(2).mean()
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        # after 10 steps the MX model tracks the bf16 one (this test run on CPU measured 23.8 dB)
        assert sqnr(y.float(), ref(x).float()) > 20

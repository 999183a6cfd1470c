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
    # bf16 outputs + fp8 operands; the CPU suite measured 28.5 dB per e4m3 GEMM, 24.6 for e5m2 grads
    gi_gw = 22.0 if recipe == "delayed" else 25.0
    assert sqnr(y, yr) > 25.0
    assert sqnr(xa.grad, xb.grad) > gi_gw
    assert sqnr(f8.weight.grad, ref.weight.grad) > gi_gw


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


@pytest.mark.parametrize(
    "recipe",
    [
        pytest.param(r, marks=pytest.mark.xfail(
            reason="known defect (2026-11-25, H100, torch 2.11): compiled rowwise weight grads differ from "
                   "eager by 16.4 dB SQNR (other recipes > 25 dB); not yet root-caused", strict=False))
        if r == "rowwise" else r
        for r in fp8train.recipe_names()
    ],
)
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
    assert sqnr(model[0].weight.grad, eager[0].weight.grad) > 25


def test_cuda_auto_filter_is_on_by_default():
    _needs_fp8()
    m = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 8192), nn.Linear(8192, 8192)).cuda()
    m = fp8train.convert_to_float8_training(m, config="tensorwise")
    report = fp8train.conversion_report(m)
    assert "auto filter" in report.skipped["0"] and "2" in report.converted

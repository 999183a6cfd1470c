"""fp8 statistics: single-tensor functions, the operand probe, the torchmetrics aggregate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import fp8train
from fp8train import Float8LinearConfig, diagnostics
from fp8train.metrics import (
    Float8Stats,
    OperandProbe,
    format_binades,
    saturation_threshold,
    underflow_threshold,
    wasted_bits_from_amax,
)
from fp8train.scaling import amax_to_scale, fp8_max, quantize

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
ROLE_NAMES = ("input", "weight", "grad_output")


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_thresholds_are_where_the_cast_changes_behaviour(dtype):
    m, thr, tiny_half = fp8_max(dtype), saturation_threshold(dtype), underflow_threshold(dtype)
    assert thr == {E4M3: 464.0, E5M2: 61440.0}[dtype]  # max + half an ulp of the top binade
    assert tiny_half == {E4M3: 2.0**-10, E5M2: 2.0**-17}[dtype]
    assert format_binades(dtype) == pytest.approx(math.log2(m / (2 * tiny_half)))
    # below the saturation threshold the unclamped cast already rounds to max
    assert torch.tensor([thr * (1 - 2**-12)]).to(dtype).float().item() == m
    # at tiny/2 the cast flushes to zero (ties to even), just above it rounds up to tiny
    y = torch.tensor([tiny_half, tiny_half * (1 + 2**-10)])
    assert y.to(dtype).float().tolist() == [0.0, 2 * tiny_half]


def test_wasted_bits_from_amax_matches_diagnostics_on_the_payload():
    x = torch.tensor([2.0, -1.0, 0.5])
    for scale in (448 / 2 / 16, 448 / 2, 448.0):
        s = torch.tensor(scale)
        ours = wasted_bits_from_amax(x.abs().amax() * s, E4M3)
        assert ours == diagnostics.wasted_bits(quantize(x, s, E4M3))  # exact: 2 * s is an fp8 value
    assert wasted_bits_from_amax(torch.tensor(0.0), E5M2) == pytest.approx(format_binades(E5M2))


def _layer(recipe: str, k: int = 64, n: int = 32) -> fp8train.Float8Linear:
    torch.manual_seed(0)
    return fp8train.convert_to_float8_training(nn.Linear(k, n), config=Float8LinearConfig.from_recipe_name(recipe))


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed", "rowwise"])
def test_probe_measures_the_layers_operands(recipe):
    layer = _layer(recipe)
    if layer.config.has_delayed:  # warm up so the stored scales are used (and lag behind)
        layer(torch.randn(16, 64)).sum().backward()
        fp8train.sync_float8_amax_and_scale_history(layer)
    x = torch.randn(2, 8, 64) * 3  # larger than the warm-up: delayed casts saturate
    x[0, :, :4] *= 1e-6  # some tiny values: underflow
    x.requires_grad_()
    grads = {}

    def keep_grad_output(module, grad_output):
        grads["go"] = grad_output[0].detach().clone()

    layer.register_full_backward_pre_hook(keep_grad_output)
    probe = OperandProbe([layer], [(True, True, True)])
    probe.attach()
    layer(x).pow(2).sum().backward()
    probe.detach()
    assert not layer._forward_hooks
    res = probe.result()
    operands = [x.detach().reshape(-1, 64), layer.weight.detach(), grads["go"].reshape(-1, 32)]
    for r, (role, t) in enumerate(zip(ROLE_NAMES, operands)):
        cfg = getattr(layer.config, f"cast_config_{role}")
        if cfg.scaling_type.value == "delayed":
            scale = getattr(layer, f"fp8_scale_{role}")
        elif cfg.axiswise:
            scale = amax_to_scale(t.abs().amax(dim=-1, keepdim=True), cfg.target_dtype, True)
        else:
            scale = amax_to_scale(t.abs().amax(), cfg.target_dtype)
        payload = quantize(t, scale, cfg.target_dtype, axiswise_dim=1 if cfg.axiswise else None)
        y = (t * scale).abs()
        assert res.amax[0, r] == t.abs().amax() and res.scaled_amax[0, r] == y.amax()
        assert res.numel[0, r] == t.numel() and res.seen[0, r] == 1
        # clamped elements (ours) are a subset of the payload's elements at max (diagnostics)
        assert res.saturated[0, r] == (y > saturation_threshold(cfg.target_dtype)).sum()
        assert res.saturated[0, r] / t.numel() <= diagnostics.saturation_fraction(payload)
        # underflow: exactly what the cast flushed
        assert res.underflow[0, r] / res.nonzero[0, r] == diagnostics.underflow_fraction(t, payload)
        if not cfg.axiswise:  # tensorwise: one scale group, the same wasted bits up to amax rounding
            ours = wasted_bits_from_amax(res.scaled_amax[0, r], cfg.target_dtype)
            assert ours == pytest.approx(float(diagnostics.wasted_bits(payload)), abs=0.2)
    assert res.underflow[0, 0] > 0
    if recipe == "delayed":
        assert res.saturated[0, 0] > 0  # the input outgrew the stored scale
    else:
        assert res.saturated.sum() == 0  # dynamic scales cannot saturate


def test_probe_skips_fallback_layers_paused_and_detached():
    layer = _layer("tensorwise")
    probe = OperandProbe([layer], [(True, True, True)], full=False)
    probe.attach()
    probe.paused = True
    layer(torch.randn(4, 64, requires_grad=True)).sum().backward()
    probe.paused = False
    layer.fp8_enabled = False
    layer(torch.randn(4, 64, requires_grad=True)).sum().backward()
    assert probe.result().seen.sum() == 0
    layer.fp8_enabled = True
    layer(torch.randn(4, 64, requires_grad=True)).sum().backward()
    probe.detach()
    layer(torch.randn(4, 64, requires_grad=True)).sum().backward()
    res = probe.result()
    assert res.seen.tolist() == [[1, 1, 1]] and not res.full
    assert res.saturated.sum() == 0 and res.amax.sum() == 0  # dynamic casts: nothing to count


def test_float8_stats_aggregates_and_marks_unobserved():
    m = Float8Stats([[E4M3, E4M3, E5M2], [E4M3, E4M3, E5M2]])
    m.update(amax=torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
             scale=torch.tensor([[14.0, 448.0, 1.0], [1.0, 1.0, 1.0]]),
             mask=torch.tensor([[True, True, False], [False, False, False]]))
    m.update(amax=torch.tensor([[3.0, 0.5, 0.0], [0.0, 0.0, 0.0]]),
             scale=torch.tensor([[10.0, 448.0, 1.0], [1.0, 1.0, 1.0]]),
             mask=torch.tensor([[True, True, False], [False, False, False]]),
             nonfinite=torch.tensor([[0, 0, 2], [0, 0, 0]]))
    out = m.compute()
    assert out["amax"][0, :2].tolist() == [3.0, 1.0]  # max over updates
    assert out["scale"][0, :2].tolist() == [10.0, 448.0]  # min over updates
    assert out["wasted_bits"][0, 0] == pytest.approx(math.log2(448 / 30))  # from max(amax * scale)
    assert out["wasted_bits"][0, 1] == 0
    assert torch.isnan(out["amax"][0, 2]) and torch.isnan(out["amax"][1]).all()  # never observed
    assert torch.isnan(out["saturation"]).all()  # no element-level data given
    assert out["nonfinite"][0, 2] == 2
    assert out["amax_nonfinite"][0, :2].tolist() == [0.0, 0.0]
    m.update(amax=torch.tensor([[float("nan"), 1.0, 1.0], [1.0, 1.0, 1.0]]))
    assert m.compute()["amax_nonfinite"][0, 0] == 1.0  # NaN survives aggregation
    m.reset()
    assert (m.amax_seen == 0).all() and (m.nonfinite == -1).all()


def test_float8_stats_takes_probe_results():
    layer = _layer("delayed")
    probe = OperandProbe([layer], [(True, True, True)])
    probe.attach()
    for _ in range(2):  # two micro-batches: counts add up, amax is the max
        layer(torch.randn(8, 64, requires_grad=True)).sum().backward()
    probe.detach()
    m = Float8Stats([[E4M3, E4M3, E5M2]])
    m.update(probe=probe.result())
    out = m.compute()
    assert torch.isfinite(out["saturation"]).all() and torch.isfinite(out["underflow"]).all()
    assert (out["wasted_bits"] >= 0).all()
    assert m.sat_numel.tolist() == [[2 * 8 * 64, 2 * 32 * 64, 2 * 8 * 32]]


def test_saturation_only_probe_agrees_with_the_full_one():
    layer = _layer("delayed")
    layer(torch.randn(16, 64)).sum().backward()
    fp8train.sync_float8_amax_and_scale_history(layer)
    x = torch.randn(64, 64) * 2
    results = []
    for full in (True, False):
        probe = OperandProbe([layer], [(True, True, True)], full=full)
        probe.attach()
        layer(x.clone().requires_grad_()).pow(2).sum().backward()
        probe.detach()
        results.append(probe.result())
    full, cheap = results
    assert full.saturated[0, 0] > 0
    assert (full.saturated - cheap.saturated).abs().max() <= 1  # |x| > thr/scale vs |x|*scale > thr rounding
    assert torch.equal(full.numel, cheap.numel)
    m = Float8Stats([[E4M3, E4M3, E5M2]])
    m.update(probe=cheap)
    out = m.compute()
    assert torch.isfinite(out["saturation"]).all() and torch.isnan(out["amax"]).all()


def test_probe_measures_mx_operands_on_their_payload():
    """mxfp8: wasted bits and underflow come from fp8train.diagnostics on the MX payload (blocks
    along each operand's first GEMM's inner dim); saturation counts what the OCP scale rule clamps."""
    from fp8train.mx import to_mx

    layer = _layer("mxfp8")  # nn.Linear's uniform(-1/8, 1/8) weight init: its top binade is clamped
    x = torch.randn(2, 8, 64) * torch.exp2(torch.randint(-8, 8, (2, 8, 1)).float())
    x[0, :, :4] *= 1e-9  # underflow within otherwise large blocks
    x.requires_grad_()
    grads = {}
    layer.register_full_backward_pre_hook(lambda m, go: grads.update(go=go[0].detach().clone()))
    probe = OperandProbe([layer], [(True, True, True)])
    probe.attach()
    layer(x).pow(2).sum().backward()
    probe.detach()
    res = probe.result()
    operands = [x.detach().reshape(-1, 64), layer.weight.detach(), grads["go"].reshape(-1, 32)]
    for r, t in enumerate(operands):
        mx = to_mx(t, "fp8_e4m3", 32)
        assert res.wasted_n[0, r] == 1
        assert res.wasted_sum[0, r] == diagnostics.wasted_bits(mx)
        assert res.underflow[0, r] / res.nonzero[0, r] == diagnostics.underflow_fraction(t, mx)
        # clamped: |x| / 2**e above 448 + half an ulp (464), e from each block's E8M0 byte
        e = mx.scale_e8m0.to(torch.float32).repeat_interleave(32, dim=-1)[:, : t.shape[-1]] - 127
        assert res.saturated[0, r] == (t.abs() * torch.exp2(-e) > 464).sum()
        assert res.amax[0, r] == t.abs().amax() and torch.isinf(res.scale[0, r])  # no single scale
    assert res.underflow[0, 0] > 0
    # uniform(-1/8, 1/8): a block's amax just under 2**-3 gets e = -12, clamping |w| > 464 * 2**-12:
    # ~9% of the elements (measured 9.9%)
    assert 0.07 < res.saturated[0, 1] / res.numel[0, 1] < 0.12

    m = Float8Stats([[E4M3, E4M3, E4M3]])
    m.update(probe=res)
    out = m.compute()
    assert torch.equal(out["wasted_bits"][0], res.wasted_sum[0])  # the payload's, not from an amax
    assert torch.isnan(out["scale"]).all() and torch.isfinite(out["underflow"]).all()


def test_float8_stats_averages_measured_wasted_bits():
    m = Float8Stats([[E4M3, E4M3, E5M2]])
    nan = math.nan
    m.update(amax=torch.tensor([[1.0, 1.0, 1.0]]), scale=torch.tensor([[448.0, 448.0, 1.0]]))
    m.update(wasted_bits=torch.tensor([[nan, 2.0, nan]]))
    m.update(wasted_bits=torch.tensor([[nan, 3.0, nan]]))
    out = m.compute()["wasted_bits"][0].tolist()
    assert out[0] == 0.0  # from amax * scale = 448
    assert out[1] == 2.5  # measured values win over the amax-derived one
    assert out[2] == pytest.approx(math.log2(57344.0))

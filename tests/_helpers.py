"""Shared test helpers (not a test module)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import fp8train
from fp8train import Float8LinearConfig


def sqnr(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB of ``actual`` against ``ref``."""
    ref, actual = ref.detach().double(), actual.detach().double()
    return float(20 * torch.log10(ref.norm() / (actual - ref).norm()))


def three_gemm_sqnr(recipe: str, emulate: bool, m: int = 256, k: int = 128, n: int = 64,
                    dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, float]:
    """SQNR (dB) of output, grad_input, grad_weight of one Float8Linear against an fp64 nn.Linear.

    Delayed recipes first run two steps on the same data and sync, so their scales are warm.
    """
    g = torch.Generator().manual_seed(seed)
    ref = nn.Linear(k, n).double()
    with torch.no_grad():
        ref.weight.copy_(torch.randn(n, k, generator=g, dtype=torch.float64) * k**-0.5)
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    go = torch.randn(m, n, generator=g, dtype=torch.float64)
    lin = copy.deepcopy(ref).to(dtype)
    cfg = Float8LinearConfig.from_recipe_name(recipe, emulate=emulate)
    f8 = fp8train.convert_to_float8_training(lin, config=cfg)
    for _ in range(2 if cfg.has_delayed else 0):
        f8(x.to(dtype)).backward(go.to(dtype))
        fp8train.sync_float8_amax_and_scale_history(f8)
    f8.zero_grad()
    x8 = x.to(dtype).requires_grad_()
    f8(x8).backward(go.to(dtype))
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    yr.backward(go)
    y = f8(x.to(dtype))
    return {
        "output": sqnr(y, yr),
        "grad_input": sqnr(x8.grad, xr.grad),
        "grad_weight": sqnr(f8.weight.grad, ref.weight.grad),
    }

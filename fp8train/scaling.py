"""Scaling math: amax → scale → saturating fp8 cast. Pure functions, no state.

A scale is the multiplier applied before the cast: ``data = saturate(x * scale).to(fp8)``, chosen so
the tensor's amax lands on the fp8 format's largest value: ``scale = fp8_max / max(amax, EPS)``.

* ``EPS`` keeps an all-zero tensor's scale finite.
* ``round_scales_to_power_of_2`` rounds the scale *down* to a power of two, so scaling and
  unscaling are exact in binary floating point.
* Casts clamp to ``±fp8_max`` before converting: overflow saturates, it never becomes inf/NaN
  (e4m3fn has no inf; an unclamped out-of-range value would become NaN).
"""

from __future__ import annotations

import torch

from fp8train.config import GemmInputRole, LinearMMConfig
from fp8train.tensor import Float8Tensor

__all__ = [
    "EPS",
    "fp8_max",
    "floor_pow2",
    "quantize",
    "saturated_cast",
    "tensor_amax",
    "amax_to_scale",
    "to_float8",
    "from_float8",
    "cast_dynamic",
]

#: smallest amax used to compute a scale (fp32); keeps scales of zero tensors finite.
EPS = 1e-12


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an fp8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def tensor_amax(x: torch.Tensor, reduce_dim: int | None = None) -> torch.Tensor:
    """max(|x|) in fp32: 0-dim for tensorwise, or keepdim along ``reduce_dim`` for axiswise."""
    if torch.compiler.is_compiling():
        # Reduce in fp32 under torch.compile. Inductor computes x's fused producer (a GELU backward,
        # say) in fp32 without rounding it to x's bf16, so a bf16 amax is rounded when it is stored:
        # the cast fused with the reduction and a later kernel reading the stored amax then derive
        # scales up to 2x apart after power-of-2 rounding (measured on an H100: compiled rowwise
        # weight grads 16.1 dB from an fp32 reference, eager 25.2 dB). Free under inductor (fused);
        # eager skips it (a bf16 amax of bf16 values is exact, and the copy would cost memory).
        x = x.to(torch.float32)
    if reduce_dim is None:
        if x.dim() >= 2:
            # rows first, then the row maxima: inductor turns this into a row reduction running at
            # ~2.4 TB/s on an H100, against ~1.5 TB/s for its split whole-tensor reduction (8192-wide)
            return x.abs().amax(dim=-1).amax().to(torch.float32)
        return x.abs().amax().to(torch.float32)
    return x.abs().amax(dim=reduce_dim, keepdim=True).to(torch.float32)


def floor_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Largest power of two <= ``scale`` (fp32, positive), by clearing the mantissa bits.

    Exact on every backend: ``exp2(floor(log2(x)))`` is not once a compiler uses approximate
    ``log2``, and a scale rounded *up* makes the largest values saturate.
    """
    bits = scale.to(torch.float32).contiguous().view(torch.int32) & 0x7F800000
    return bits.view(torch.float32)


def amax_to_scale(amax: torch.Tensor, dtype: torch.dtype, round_to_power_of_2: bool = False) -> torch.Tensor:
    """fp32 scale that maps ``amax`` to the fp8 max of ``dtype`` (elementwise over ``amax``)."""
    scale = fp8_max(dtype) / torch.clamp(amax.to(torch.float32), min=EPS)
    if round_to_power_of_2:
        scale = floor_pow2(scale)
    return scale


def saturated_cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``clamp(x * scale, ±fp8_max).to(dtype)``: the fp8 payload of ``x`` (never inf/NaN from overflow)."""
    m = fp8_max(dtype)
    return torch.clamp(x.to(torch.float32) * scale, min=-m, max=m).to(dtype)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    linear_mm_config: LinearMMConfig | None = None,
    role: GemmInputRole = GemmInputRole.INPUT,
    axiswise_dim: int | None = None,
) -> Float8Tensor:
    """Saturating cast to a Float8Tensor (not differentiable; ``to_float8`` is)."""
    data = saturated_cast(x, scale, dtype)
    return Float8Tensor(data, scale, x.dtype, linear_mm_config, role, axiswise_dim)


class _ToFloat8(torch.autograd.Function):
    """hp → Float8Tensor; the gradient passes straight through (d fp8(x) / dx := 1)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        scale: torch.Tensor,
        dtype: torch.dtype,
        linear_mm_config: LinearMMConfig | None,
        role: GemmInputRole,
        axiswise_dim: int | None,
    ) -> Float8Tensor:
        return quantize(x, scale, dtype, linear_mm_config, role, axiswise_dim)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> tuple:  # type: ignore[override]
        if isinstance(g, Float8Tensor):
            g = g.dequantize()
        return g, None, None, None, None, None


class _FromFloat8(torch.autograd.Function):
    """Float8Tensor → hp; the gradient passes straight through."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, t: Float8Tensor) -> torch.Tensor:  # type: ignore[override]
        return t.dequantize()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


def to_float8(
    x: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    *,
    linear_mm_config: LinearMMConfig | None = None,
    role: GemmInputRole = GemmInputRole.INPUT,
    axiswise_dim: int | None = None,
) -> Float8Tensor:
    """Saturating, differentiable cast of ``x`` with a given ``scale`` (0-dim or axiswise-shaped)."""
    return _ToFloat8.apply(x, scale, dtype, linear_mm_config, role, axiswise_dim)


def from_float8(t: Float8Tensor) -> torch.Tensor:
    """Differentiable dequantization to ``t``'s original dtype."""
    return _FromFloat8.apply(t)


def cast_dynamic(
    x: torch.Tensor,
    dtype: torch.dtype,
    *,
    reduce_dim: int | None = None,
    round_to_power_of_2: bool = False,
    linear_mm_config: LinearMMConfig | None = None,
    role: GemmInputRole = GemmInputRole.INPUT,
) -> Float8Tensor:
    """Cast with a scale from ``x``'s own amax (tensorwise, or axiswise along ``reduce_dim``)."""
    scale = amax_to_scale(tensor_amax(x, reduce_dim), dtype, round_to_power_of_2)
    dim = None if reduce_dim is None else reduce_dim % x.dim()
    return to_float8(x, scale, dtype, linear_mm_config=linear_mm_config, role=role, axiswise_dim=dim)

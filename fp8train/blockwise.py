"""Row-blockwise fp8 (e4m3) storage: each row of a ``[R, C]`` tensor cut into blocks of ``block``
elements along the last dimension, one fp32 scale per block.

Used where tensors are *stored* (optimizer moments, ``fp8train.optim``) or *sent* (gradient
chunks, ``fp8train.reduce_scatter``) in fp8, never for GEMMs. Blocks run along the last dimension
only, so a tensor sharded along any other dimension (FSDP2 shards dim 0) has its scales sharded the
same way: ``scale`` is ``[R, ceil(C / block)]`` and shards like the data's rows.

Quantization, for a block ``x`` (fp32)::

    amax  = max |x|
    scale = amax / 448                       # dequantization multiplier, stored (fp32)
    data  = e4m3(x * 448 / amax)             # in [-448, 448]; all-zero (or < 1e-30) blocks give 0
    x    ~= data.float() * scale

Rounding is round-to-nearest-even or, with ``stochastic=True``, stochastic: unbiased in
expectation, which keeps an exponential moving average moving when each step's change is below
half a unit in the last place (round-to-nearest would round it away: e4m3 has 3 mantissa bits).
Stochastic rounding draws from torch's default generator of the tensor's device.

No function here reads a tensor value on the host: safe inside a training step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "E4M3",
    "E4M3_MAX",
    "blockwise_scale_shape",
    "dequantize_blockwise",
    "quantize_blockwise_",
    "round_to_bf16",
]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
# below this amax a block is stored as zeros: 448 / amax would overflow fp32
_MIN_AMAX = 1e-30
_E4M3_MIN_NORMAL_EXP = -6  # smallest normal e4m3 is 2**-6; subnormal spacing is 2**-9
_E4M3_MANTISSA_BITS = 3


def blockwise_scale_shape(shape: torch.Size | tuple[int, ...], block: int) -> tuple[int, ...]:
    """Shape of the scales of a tensor of ``shape`` (>= 1 dim): ``[*shape[:-1], ceil(shape[-1] / block)]``."""
    return (*shape[:-1], math.ceil(shape[-1] / block))


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[R, C]`` -> ``[R, nblk, block]``, zero-padding the last block."""
    rows, cols = x.shape
    pad = -cols % block
    if pad:
        x = F.pad(x, (0, pad))
    return x.view(rows, (cols + pad) // block, block)


def _times_blocks(x: torch.Tensor, per_block: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` ``[R, C]`` times each block's value of ``per_block`` ``[R, nblk]`` (a new ``[R, C]`` tensor;
    broadcast over a ``[R, nblk, block]`` view, so no per-element copy of ``per_block`` is made)."""
    rows, cols = x.shape
    nblk = per_block.shape[1]
    if cols == nblk * block:
        return (x.reshape(rows, nblk, block) * per_block.unsqueeze(-1)).view(rows, cols)
    # a gather, not repeat_interleave or expand + slice: torch 2.13's inductor (CPU) miscompiles those
    return x * per_block[:, torch.arange(cols, device=per_block.device) // block]


def _stochastic_e4m3_dither(y: torch.Tensor) -> torch.Tensor:
    """Add uniform noise of one e4m3 unit in the last place (ulp) centred on 0, so that the
    round-to-nearest cast that follows rounds to either neighbour with probability proportional
    to the distance (stochastic rounding). ``y`` is fp32, already scaled into e4m3's range.

    ulp(y) = 2**(floor(log2|y|) - 3) for normal e4m3 values, 2**-9 for subnormals; the exponent
    is read from the fp32 bits (integer ops only, traceable by torch.compile).
    """
    exponent = ((y.view(torch.int32) >> 23) & 0xFF) - 127  # floor(log2|y|) for normal fp32
    ulp_exp = (exponent - _E4M3_MANTISSA_BITS).clamp_(min=_E4M3_MIN_NORMAL_EXP - _E4M3_MANTISSA_BITS)
    ulp = ((ulp_exp + 127) << 23).view(torch.float32)
    return y + (torch.rand_like(y) - 0.5) * ulp


def quantize_blockwise_(
    x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, block: int, stochastic: bool = False
) -> None:
    """Quantize ``x`` into the existing ``data`` and ``scale`` tensors (in place).

    Args:
        x: ``[R, C]`` fp32 values.
        data: ``[R, C]`` ``float8_e4m3fn`` output.
        scale: ``[R, ceil(C / block)]`` fp32 output, the dequantization multipliers.
        block: elements per block along ``C``.
        stochastic: stochastic rounding instead of round-to-nearest-even.
    """
    rows, cols = x.shape
    amax = _blocks(x, block).abs().amax(dim=-1)  # [R, nblk]
    nonzero = amax > _MIN_AMAX
    inv = torch.where(nonzero, E4M3_MAX / amax.clamp(min=_MIN_AMAX), torch.zeros_like(amax))
    y = _times_blocks(x, inv, block)
    if stochastic:
        y = _stochastic_e4m3_dither(y)
    # the cast saturates on recent torch, but is not documented to: clamp explicitly
    data.copy_(y.clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3))
    scale.copy_(torch.where(nonzero, amax / E4M3_MAX, torch.zeros_like(amax)))


def dequantize_blockwise(data: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """``[R, C]`` e4m3 ``data`` and ``[R, ceil(C / block)]`` fp32 ``scale`` -> ``[R, C]`` fp32 (new tensor)."""
    return _times_blocks(data.float(), scale, block)


def round_to_bf16(x: torch.Tensor, stochastic: bool = False) -> torch.Tensor:
    """fp32 ``x`` -> bf16, round-to-nearest-even or stochastic (random low 16 bits added, then truncated).

    Stochastic rounding of a negative value rounds its magnitude, which is the same thing for a
    sign-magnitude format. Non-finite values stay non-finite.
    """
    if not stochastic:
        return x.to(torch.bfloat16)
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    # the sum's low 16 bits are dropped, so the bf16 cast below is exact
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)

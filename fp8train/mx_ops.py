"""MX operands for ``Float8Linear``: cast along a GEMM's inner dim, multiply natively or emulated.

With ``scaling_granularity="mx"`` (the ``mxfp8`` recipe) each operand of each GEMM is quantized to
OCP MX (``fp8train.mx``): fp8 elements with one E8M0 power-of-two scale per ``block_size``
elements *along that GEMM's inner dimension* (a block scale must be constant over each stretch of
the dot product the hardware sums before applying it). So, unlike a tensorwise cast, no operand
cast for the forward can serve backward: ``x`` is blocked along K for the output GEMM and along M
(tokens) for grad_weight, ``W`` along K and along N, ``dy`` along N and along M.

An ``MxOperand`` keeps the payload with the blocks along the last dim of ``qdata``; ``transposed``
says the operand is ``qdata``'s transpose. In ``a @ b`` (``a: [M, K]``, ``b: [K, N]``) both are
blocked along K, so ``a`` is stored as itself and ``b`` as ``b.T`` — the row-major A /
column-major B layout the block-scaled ``_scaled_mm`` reads::

    a.qdata [M, Kp] fp8    a.scale [M, Kp // bs] uint8 (biased E8M0)    transposed=False
    b.qdata [N, Kp] fp8    b.scale [N, Kp // bs] uint8                  transposed=True
    Kp = K rounded up to a multiple of block_size, zero-padded (an odd token count M is fine)

Execution (``mx_mm``):

* **native** (CUDA capability >= 10.0, i.e. Blackwell; fp8 elements; ``block_size`` 32; the GEMM's
  ``emulate`` off): ``torch._scaled_mm`` with ``float8_e8m0fnu`` scales in cuBLAS' swizzled
  layout (``swizzle_scales``). There is no such GPU here: this path is untested in CI.
* **emulated** everywhere else (CPU, Hopper): dequantize both operands to the compute dtype, then
  ``torch.mm``. The quantization is the same, so are the numerics up to accumulation order. It is
  a numerics tool, *slower* than bf16: a quantize and a dequantize pass per operand and GEMM.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fp8train.config import CastConfig, Float8LinearConfig, ScaledMMConfig
from fp8train.mx import STANDARD_BLOCK_SIZE
from fp8train.ops import _round_through_fp8

__all__ = ["MxOperand", "mx_cast", "mx_mm", "mx_runs_native", "native_mx_supported", "swizzle_scales"]

#: MX element format of each fp8 ``CastConfig.target_dtype``.
MX_ELEM_OF_DTYPE: dict[torch.dtype, str] = {torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}
#: cuBLAS' MX scale layout: tiles of 128 rows x 4 block columns, 512 bytes each.
_TILE_ROWS, _TILE_COLS = 128, 4


class MxOperand(NamedTuple):
    """One GEMM operand in MX form (see the module docstring for the layout)."""

    qdata: Tensor  # [R, Kp] fp8 elements, blocks along the last dim
    scale: Tensor  # uint8 [R, Kp // block_size], biased E8M0 (255 = NaN)
    elem_dtype: str  # "fp8_e4m3" or "fp8_e5m2"
    block_size: int
    inner: int  # length of the blocked dim before padding (the GEMM's K)
    transposed: bool  # the operand is qdata's transpose: [K, R]

    def t(self) -> "MxOperand":
        return MxOperand(self.qdata, self.scale, self.elem_dtype, self.block_size, self.inner, not self.transposed)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """The operand's values in ``dtype``, padding dropped, in the operand's orientation."""
        v = torch.ops.fp8train.mx_dequantize(self.qdata, self.scale, self.elem_dtype, self.block_size,
                                             self.inner, dtype)
        return v.t() if self.transposed else v


def mx_cast(t: Tensor, cfg: CastConfig, reduce_dim: int) -> MxOperand:
    """Quantize a 2-D operand ``t`` to MX with blocks along ``reduce_dim``, its GEMM's inner dim
    (``-1``/``1``: along rows, ``0``: along columns). ``cfg`` is an ``mx`` cast."""
    elem = MX_ELEM_OF_DTYPE[cfg.target_dtype]
    transposed = reduce_dim % 2 == 0
    src = t.t() if transposed else t
    qdata, scale = torch.ops.fp8train.mx_quantize(src, elem, cfg.block_size)
    return MxOperand(qdata, scale, elem, cfg.block_size, src.shape[-1], transposed)


def swizzle_scales(scale: Tensor) -> Tensor:
    """MX scales ``[rows, blocks]`` in cuBLAS' block-scaling-factor layout, flattened.

    The matrix is zero-padded to whole tiles of 128 rows x 4 columns; tiles follow each other in
    row-major tile order (512 bytes each), and inside a tile the entry at row ``r``, column ``c``
    sits at byte ``(r % 32) * 16 + (r // 32) * 4 + c`` (cuBLAS docs, "1D block scaling factors
    layout"). Returns ``[ceil(rows / 128) * 128 * ceil(blocks / 4) * 4]`` of ``scale``'s dtype.
    """
    rows, cols = scale.shape
    pad_r, pad_c = -rows % _TILE_ROWS, -cols % _TILE_COLS
    padded = F.pad(scale, (0, pad_c, 0, pad_r)) if pad_r or pad_c else scale
    n_r, n_c = (rows + pad_r) // _TILE_ROWS, (cols + pad_c) // _TILE_COLS
    tiles = padded.reshape(n_r, 4, 32, n_c, _TILE_COLS)  # [tile row, r // 32, r % 32, tile col, c]
    return tiles.permute(0, 3, 2, 1, 4).contiguous().flatten()


def native_mx_supported(device: torch.device) -> bool:
    """Whether ``device`` runs block-scaled MX GEMMs in hardware (CUDA capability >= 10.0)."""
    if device.type != "cuda":
        return False
    props = torch.cuda.get_device_properties(device)  # constant-folded by torch.compile
    return (props.major, props.minor) >= (10, 0)


def _runs_native(a: MxOperand, b: MxOperand, config: ScaledMMConfig) -> bool:
    return (
        not config.emulate
        and a.block_size == STANDARD_BLOCK_SIZE
        and a.elem_dtype in MX_ELEM_OF_DTYPE.values()
        and b.elem_dtype in MX_ELEM_OF_DTYPE.values()
        and native_mx_supported(a.qdata.device)
    )


def mx_runs_native(config: Float8LinearConfig, device: torch.device) -> bool:
    """Whether every MX GEMM of ``config`` runs natively on ``device`` (False: some are emulated).

    Raises:
        ValueError: ``config`` has no MX operand.
    """
    if not config.has_mx:
        raise ValueError(f"mx_runs_native: config {config.name!r} has no MX operand (no scaling_granularity='mx')")
    mm = config.linear_mm_config
    gemm_config = {"output": mm.output, "grad_input": mm.grad_input, "grad_weight": mm.grad_weight}
    mx_gemms = [(gemm_config[gemm], a) for gemm, (_, a), _ in config.gemm_operands() if a.mx]
    return native_mx_supported(device) and all(
        not g.emulate and a.block_size == STANDARD_BLOCK_SIZE for g, a in mx_gemms
    )


def _native_mm(a: MxOperand, b: MxOperand, use_fast_accum: bool) -> Tensor:
    # --- native block-scaled GEMM (sm_100+; not exercised in CI) ---------------------------------
    # E8M0 scales are biased exponents, bit for bit our uint8 scales; cuBLAS wants them swizzled.
    e8m0 = torch.float8_e8m0fnu
    return torch._scaled_mm(
        a.qdata,  # [M, Kp] row-major
        b.qdata.t(),  # [Kp, N] column-major
        scale_a=swizzle_scales(a.scale).view(e8m0),
        scale_b=swizzle_scales(b.scale).view(e8m0),
        out_dtype=torch.bfloat16,
        use_fast_accum=use_fast_accum,
    )


def mx_mm(a: MxOperand, b: MxOperand, config: ScaledMMConfig, out_dtype: torch.dtype,
          compute_dtype: torch.dtype) -> Tensor:
    """``a @ b`` for MX operands ``a: [M, K]``, ``b: [K, N]`` blocked along K; ``[M, N]`` in ``out_dtype``.

    Native where ``native_mx_supported`` (result computed in bf16), otherwise emulated in
    ``compute_dtype``. ``config.fp8_output`` rounds the result through e4m3 as for fp8 GEMMs;
    ``use_fast_accum`` applies to the native kernel only; ``pad_inner_dim`` is moot (MX pads K).

    Raises:
        ValueError: an operand not blocked along K, or the two disagree on K or block size.
    """
    if a.transposed or not b.transposed or a.inner != b.inner or a.block_size != b.block_size:
        raise ValueError(
            f"mx_mm: both operands must be blocked along the inner dim K of a [M, K] @ [K, N] GEMM with one "
            f"block size; got a (transposed={a.transposed}, K={a.inner}, block_size={a.block_size}) and b "
            f"(transposed={b.transposed}, K={b.inner}, block_size={b.block_size}); valid: a transposed=False, "
            f"b transposed=True, equal K and block_size"
        )
    if _runs_native(a, b, config):
        y = _native_mm(a, b, config.use_fast_accum)
    else:
        y = torch.mm(a.dequantize(compute_dtype), b.dequantize(compute_dtype))
    y = y.to(out_dtype)
    return _round_through_fp8(y) if config.fp8_output else y

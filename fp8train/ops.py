"""The one ``scaled_mm``: fp8 GEMM through ``torch._scaled_mm`` or emulated, plus ``aten.mm``/``addmm``
handlers so ``torch.mm(a_fp8, b_fp8)`` works on Float8Tensors.

Layouts ``torch._scaled_mm(a, b)`` needs (CUDA): ``a`` ``[M, K]`` row-major, ``b`` ``[K, N]``
column-major (i.e. ``b.t()`` contiguous), ``K`` and ``N`` multiples of 16, fp32 scales that are
0-dim (tensorwise) or ``[M, 1]`` / ``[1, N]`` (rowwise; rowwise results are bf16). The CPU kernel
has no alignment limits, but fp8train applies the CUDA rules everywhere so a model behaves the same
on every device: a misaligned inner dim is zero-padded (``pad_inner_dim``) or the GEMM is emulated.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from fp8train.config import GemmInputRole, ScaledMMConfig
from fp8train.scaling import amax_to_scale, fp8_max, tensor_amax
from fp8train.tensor import Float8Tensor, implements

__all__ = ["Fp8Operand", "scaled_mm", "scaled_mm_operands", "is_aligned"]

_ALIGN = 16


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


#: torch 2.11's CPU ``_scaled_mm`` (mkldnn) takes only tensorwise scales for most shapes; 2.13's
#: takes rowwise ones (verified). Older CPU builds emulate rowwise GEMMs instead.
ROWWISE_ON_CPU: bool = _torch_version() >= (2, 13)


def is_aligned(n: int) -> bool:
    return n % _ALIGN == 0


class Fp8Operand(NamedTuple):
    """fp8 ``data`` with the fp32 ``scale`` applied before the cast (``hp ≈ data / scale``).

    The plain-tensor form of a Float8Tensor that the linear's autograd function passes around
    (plain tensors trace identically under every supported torch.compile version).
    """

    data: torch.Tensor
    scale: torch.Tensor  # 0-dim (tensorwise), [rows, 1] or [1, cols] (axiswise)
    # the same fp8 values in the other memory layout (column-major when data is row-major), when a
    # cast produced both at once (fp8train.cast_kernel): the GEMM takes whichever layout it needs
    other: torch.Tensor | None = None

    def t(self) -> "Fp8Operand":
        other = None if self.other is None else self.other.t()
        return Fp8Operand(self.data.t(), self.scale.t() if self.scale.dim() == 2 else self.scale, other)

    def layout(self, row_major: bool) -> torch.Tensor:
        """The data row-major (``row_major``) or column-major, copying only when no layout held fits."""
        for d in (self.data, self.other):
            if d is not None and (d.is_contiguous() if row_major else d.t().is_contiguous()):
                return d
        return self.data.contiguous() if row_major else self.data.t().contiguous().t()

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.data.to(torch.float32) / self.scale).to(dtype)


def _scale_inv(scale: torch.Tensor, rows: int | None, cols: int | None) -> torch.Tensor:
    """Reciprocal scale shaped for ``_scaled_mm``: 0-dim, ``[rows, 1]`` or ``[1, cols]``."""
    inv = scale.reciprocal().to(torch.float32)
    if inv.dim() == 0:
        return inv
    if rows is not None:
        return inv.reshape(rows, 1)
    return inv.reshape(1, cols)


def _pad_cols(x: torch.Tensor, pad: int) -> torch.Tensor:
    # fp8 zero is the all-zero byte in both formats; pad through uint8 (not every fp8 pad kernel exists)
    return F.pad(x.contiguous().view(torch.uint8), (0, pad)).view(x.dtype)


def _round_through_fp8(y: torch.Tensor) -> torch.Tensor:
    dtype = torch.float8_e4m3fn
    scale = amax_to_scale(tensor_amax(y), dtype)
    m = fp8_max(dtype)
    y8 = torch.clamp(y.to(torch.float32) * scale, -m, m).to(dtype)
    return (y8.to(torch.float32) / scale).to(y.dtype)


def scaled_mm_operands(a: Fp8Operand, b: Fp8Operand, config: ScaledMMConfig, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` for fp8 operands ``a: [M, K]``, ``b: [K, N]``; result ``[M, N]`` in ``out_dtype``.

    Scales: ``a`` 0-dim or ``[M, 1]``; ``b`` 0-dim or ``[1, N]``.
    """
    (m, k), n = a.data.shape, b.data.shape[1]
    rowwise = a.scale.dim() > 0 or b.scale.dim() > 0
    no_kernel = rowwise and not a.data.is_cuda and not ROWWISE_ON_CPU
    if config.emulate or no_kernel or not is_aligned(n) or (not is_aligned(k) and not config.pad_inner_dim):
        y = torch.mm(a.dequantize(torch.float32), b.dequantize(torch.float32)).to(out_dtype)
        return _round_through_fp8(y) if config.fp8_output else y

    a_data, b_data = a.layout(row_major=True), b.layout(row_major=False)
    if not is_aligned(k):
        pad = _ALIGN - k % _ALIGN
        a_data = _pad_cols(a_data, pad)
        b_data = _pad_cols(b_data.t(), pad).t()  # zero rows of b, kept column-major

    scale_a = _scale_inv(a.scale, m, None)
    scale_b = _scale_inv(b.scale, None, n)
    if rowwise:  # _scaled_mm wants both scales rowwise-shaped when either is
        scale_a = scale_a.expand(m, 1).contiguous() if scale_a.dim() == 0 else scale_a
        scale_b = scale_b.expand(1, n).contiguous() if scale_b.dim() == 0 else scale_b
    mm_dtype = torch.bfloat16 if rowwise and a_data.is_cuda else out_dtype
    y = torch._scaled_mm(
        a_data, b_data, scale_a=scale_a, scale_b=scale_b, out_dtype=mm_dtype, use_fast_accum=config.use_fast_accum
    )
    y = y.to(out_dtype)
    return _round_through_fp8(y) if config.fp8_output else y


def scaled_mm(
    a: Float8Tensor, b: Float8Tensor, config: ScaledMMConfig, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``a @ b`` for Float8Tensors ``a: [M, K]``, ``b: [K, N]``; result in ``out_dtype``
    (default: ``a``'s original dtype). See ``scaled_mm_operands``."""
    return scaled_mm_operands(
        Fp8Operand(a._data, a._scale), Fp8Operand(b._data, b._scale), config, out_dtype or a._orig_dtype
    )


_GEMM_BY_ROLES = {
    (GemmInputRole.INPUT, GemmInputRole.WEIGHT): "output",
    (GemmInputRole.GRAD_OUTPUT, GemmInputRole.WEIGHT): "grad_input",
    (GemmInputRole.GRAD_OUTPUT, GemmInputRole.INPUT): "grad_weight",
}


def _config_for(a: Float8Tensor, b: Float8Tensor) -> ScaledMMConfig:
    gemm = _GEMM_BY_ROLES.get((a._gemm_input_role, b._gemm_input_role), "output")
    return getattr(a._linear_mm_config, gemm)


@implements([torch.ops.aten.mm.default, torch.ops.aten.matmul.default])
def _mm(func: Any, args: Any, kwargs: Any) -> torch.Tensor:
    a, b = args[0], args[1]
    if not (isinstance(a, Float8Tensor) and isinstance(b, Float8Tensor)):
        raise NotImplementedError(f"{func} needs both operands as Float8Tensor; got {type(a).__name__}, {type(b).__name__}")
    return scaled_mm(a, b, _config_for(a, b))


@implements([torch.ops.aten.addmm.default])
def _addmm(func: Any, args: Any, kwargs: Any) -> torch.Tensor:
    bias, a, b = args[0], args[1], args[2]
    if not (isinstance(a, Float8Tensor) and isinstance(b, Float8Tensor)) or isinstance(bias, Float8Tensor):
        raise NotImplementedError(f"{func} needs Float8Tensor operands and a plain bias")
    return scaled_mm(a, b, _config_for(a, b)) + bias

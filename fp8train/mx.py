"""OCP Microscaling (MX) v1.0 formats: blocks of elements sharing one power-of-two scale.

An MX tensor splits the last dim of ``x`` into blocks of ``block_size`` contiguous elements
(32 in the OCP spec). Each block stores one shared scale ``X = 2**e`` as a biased E8M0 byte and
``block_size`` low-precision elements ``P``; a value is ``X * P``::

    x        [..., K]                              high precision (fp32 / bf16 / fp16)
    padded   [..., Kp]      Kp = ceil(K / block_size) * block_size, zeros appended
    qdata    [..., Kp]      elements (fp4: [..., Kp // 2], two per byte)
    scale    [..., Kp // block_size]  uint8, biased exponent e + 127 (0xFF = NaN)

Scale rule (OCP MX v1.0, section 6.3)::

    e = clamp(floor(log2(amax(|block|))) - emax_elem, -127, 127)
    P = saturate(block / 2**e)           clamp to ±max_elem, then round to nearest even

so a block's largest element lands in the element format's top binade ``[2**emax, 2**(emax+1))``;
for e4m3 that binade ends at 448 < 512, so the largest elements may saturate (by design of the
spec: never inf/NaN from overflow). An all-zero block gets the smallest exponent (-127). A block
holding NaN or ±inf gets scale 0xFF (NaN) and dequantizes to NaN; its elements are stored as 0.

Element formats (``elem_dtype``), storage of ``qdata``:

============  =====  ========  ===========================================================
name          emax   max       qdata
============  =====  ========  ===========================================================
fp8_e4m3      8      448       ``torch.float8_e4m3fn``, one per element
fp8_e5m2      15     57344     ``torch.float8_e5m2``, one per element
fp6_e2m3      2      7.5       ``torch.uint8`` bit pattern (sign bit 5), one per byte, unpacked
fp6_e3m2      4      28        ``torch.uint8`` bit pattern (sign bit 5), one per byte, unpacked
fp4_e2m1      2      6         ``torch.uint8``, two per byte: element 2i in the low nibble,
                               element 2i+1 in the high nibble (sign is the nibble's bit 3)
============  =====  ========  ===========================================================

The quantize / dequantize kernels are ``torch.library`` custom ops (``fp8train::mx_quantize``,
``fp8train::mx_dequantize``, ``fp8train::mx_fake_quantize``) with fake kernels, so
``torch.compile(fullgraph=True)`` traces ``to_mx(x).to_dtype(...)`` without graph breaks.
``to_mx`` is not differentiable (its payload is integer-like); training code calls
``mx_fake_quantize`` or ``mx_linear``, whose gradients pass straight through the quantizer.

Example:
    >>> x = torch.randn(4, 70)
    >>> mx = to_mx(x, "fp8_e4m3", block_size=32)
    >>> mx.qdata.shape, mx.scale_e8m0.shape          # 70 padded to 96: three blocks per row
    (torch.Size([4, 96]), torch.Size([4, 3]))
    >>> mx.to_dtype(torch.float32).shape
    torch.Size([4, 70])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MX_ELEM_DTYPES",
    "MXElemFormat",
    "MXTensor",
    "mx_fake_quantize",
    "mx_linear",
    "to_mx",
]

#: the OCP block size; any power of two in ``[MIN_BLOCK_SIZE, MAX_BLOCK_SIZE]`` is accepted.
STANDARD_BLOCK_SIZE = 32
MIN_BLOCK_SIZE = 2
MAX_BLOCK_SIZE = 256

E8M0_BIAS = 127
E8M0_NAN = 255
_MIN_EXP, _MAX_EXP = -127, 127


# --- element formats -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MXElemFormat:
    """One MX element format.

    Attributes:
        name: key in ``MX_ELEM_DTYPES`` (``"fp8_e4m3"``).
        ebits, mbits: exponent and mantissa bits (plus one sign bit).
        emax: exponent of the largest normal binade (the ``emax_elem`` of the scale rule).
        max: largest finite magnitude.
        torch_dtype: the native torch dtype of fp8 formats; ``None`` for sub-byte formats, which
            are stored as uint8 bit patterns.
    """

    name: str
    ebits: int
    mbits: int
    emax: int
    max: float
    torch_dtype: torch.dtype | None = None

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def bias(self) -> int:
        return 2 ** (self.ebits - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade (subnormals share its quantum)."""
        return 1 - self.bias

    @property
    def tiny(self) -> float:
        """Smallest positive (subnormal) magnitude."""
        return 2.0 ** (self.emin - self.mbits)

    @property
    def packed_per_byte(self) -> int:
        """Elements per stored byte of ``qdata`` (2 for fp4, else 1)."""
        return 2 if self.bits == 4 else 1

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.torch_dtype if self.torch_dtype is not None else torch.uint8

    def __str__(self) -> str:
        return f"MX{self.name.split('_')[0].upper()} {self.name.split('_')[1].upper()}"


def _ieee_like(name: str, ebits: int, mbits: int) -> MXElemFormat:
    """A format with no inf/NaN encodings: every bit pattern is a finite number (fp6, fp4)."""
    bias = 2 ** (ebits - 1) - 1
    emax = 2**ebits - 1 - bias
    return MXElemFormat(name, ebits, mbits, emax, 2.0**emax * (2 - 2.0**-mbits))


MX_ELEM_DTYPES: dict[str, MXElemFormat] = {
    "fp8_e4m3": MXElemFormat("fp8_e4m3", 4, 3, 8, 448.0, torch.float8_e4m3fn),
    "fp8_e5m2": MXElemFormat("fp8_e5m2", 5, 2, 15, 57344.0, torch.float8_e5m2),
    "fp6_e2m3": _ieee_like("fp6_e2m3", 2, 3),
    "fp6_e3m2": _ieee_like("fp6_e3m2", 3, 2),
    "fp4_e2m1": _ieee_like("fp4_e2m1", 2, 1),
}


def _elem_format(owner: str, elem_dtype: object) -> MXElemFormat:
    if not isinstance(elem_dtype, str) or elem_dtype not in MX_ELEM_DTYPES:
        raise ValueError(f"{owner}: elem_dtype={elem_dtype!r} is invalid; valid: one of {list(MX_ELEM_DTYPES)}")
    return MX_ELEM_DTYPES[elem_dtype]


def _check_block_size(owner: str, block_size: object) -> int:
    ok = (
        isinstance(block_size, int)
        and not isinstance(block_size, bool)
        and MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
        and block_size & (block_size - 1) == 0
    )
    if not ok:
        raise ValueError(
            f"{owner}: block_size={block_size!r} is invalid; valid: a power of two from {MIN_BLOCK_SIZE} "
            f"to {MAX_BLOCK_SIZE} ({STANDARD_BLOCK_SIZE} is the OCP standard)"
        )
    return block_size  # type: ignore[return-value]


def _check_input(owner: str, x: object, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(
            f"{owner}: {name} is 0-dim; MX blocks run along the last dim, so give {name} at least one dim "
            "(e.g. .reshape(1))"
        )
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(
            f"{owner}: {name}.dtype={x.dtype} is invalid; valid: torch.float32, torch.bfloat16, "
            "torch.float16 or torch.float64"
        )
    return x


def _padded_len(k: int, block_size: int) -> int:
    return -(-k // block_size) * block_size


# --- exact E8M0 <-> fp32 ------------------------------------------------------------------------------
def _e8m0_to_fp32(biased: Tensor) -> Tensor:
    """``2**(biased - 127)`` in fp32, built from its bit pattern so it is exact down to 2**-127
    (a subnormal, which ``exp2`` implementations may not hit exactly); 255 → NaN."""
    b = biased.to(torch.int32)
    bits = torch.where(b == 0, torch.full_like(b, 0x00400000), b << 23)
    bits = torch.where(b == E8M0_NAN, torch.full_like(b, 0x7FC00000), bits)
    return bits.view(torch.float32)


def _block_exponent(amax: Tensor, fmt: MXElemFormat) -> Tensor:
    """Biased E8M0 scale (uint8) of each block from its fp32 amax."""
    # frexp gives amax = m * 2**ex with m in [0.5, 1): floor(log2(amax)) = ex - 1, exactly
    # (log2 in fp32 can round up just below a power of two)
    _, ex = torch.frexp(amax)
    exp = torch.clamp(ex - 1 - fmt.emax, _MIN_EXP, _MAX_EXP)
    exp = torch.where(amax == 0, torch.full_like(exp, _MIN_EXP), exp)
    biased = exp + E8M0_BIAS
    return torch.where(torch.isfinite(amax), biased, torch.full_like(biased, E8M0_NAN)).to(torch.uint8)


# --- sub-byte element encoding ----------------------------------------------------------------------
def _encode_subbyte(y: Tensor, fmt: MXElemFormat) -> Tensor:
    """fp32 values already clamped to ±fmt.max → uint8 bit patterns, rounded to nearest even."""
    a = y.abs()
    _, ex = torch.frexp(a)
    # subnormals (and zero, whose frexp exponent is 0) use the smallest normal binade's quantum
    e = torch.where(a == 0, fmt.emin, torch.clamp(ex - 1, min=fmt.emin))
    quantum = torch.ldexp(torch.ones_like(a), (e - fmt.mbits).to(a.dtype))
    m = torch.round(a / quantum).to(torch.int32)  # torch.round is half-to-even
    # Bit patterns of positive values are ordered like the values, and (e - emin) * 2**mbits + m
    # is that pattern for subnormals, normals, and a mantissa that rounded up into the next binade.
    mag = (e - fmt.emin) * (1 << fmt.mbits) + m
    sign = torch.signbit(y).to(torch.int32) << (fmt.ebits + fmt.mbits)
    return (mag | sign).to(torch.uint8)


def _code_table(fmt: MXElemFormat, device: torch.device) -> Tensor:
    """fp32 value of every bit pattern of a sub-byte format, indexed by the pattern."""
    values = []
    for code in range(2**fmt.bits):
        mag = code & ((1 << (fmt.ebits + fmt.mbits)) - 1)
        e_field, mant = mag >> fmt.mbits, mag & ((1 << fmt.mbits) - 1)
        if e_field == 0:
            v = mant * 2.0 ** (fmt.emin - fmt.mbits)
        else:
            v = (1 + mant / 2**fmt.mbits) * 2.0 ** (e_field - fmt.bias)
        values.append(-v if code >> (fmt.ebits + fmt.mbits) else v)
    return torch.tensor(values, dtype=torch.float32, device=device)


def _pack_fp4(codes: Tensor) -> Tensor:
    """[..., 2n] 4-bit codes → [..., n] bytes; element 2i in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack_fp4(packed: Tensor) -> Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def _encode(y: Tensor, fmt: MXElemFormat) -> Tensor:
    """Clamped fp32 elements [..., Kp] → stored qdata."""
    if fmt.torch_dtype is not None:
        return y.to(fmt.torch_dtype)
    codes = _encode_subbyte(y, fmt)
    return _pack_fp4(codes) if fmt.packed_per_byte == 2 else codes


def _decode(qdata: Tensor, fmt: MXElemFormat) -> Tensor:
    """Stored qdata → fp32 element values [..., Kp] (no block scale applied)."""
    if fmt.torch_dtype is not None:
        return qdata.to(torch.float32)
    codes = _unpack_fp4(qdata) if fmt.packed_per_byte == 2 else qdata
    return _code_table(fmt, qdata.device)[codes.to(torch.int64)]


# --- kernels and custom ops --------------------------------------------------------------------------
def _quantize(x: Tensor, elem_dtype: str, block_size: int) -> tuple[Tensor, Tensor]:
    fmt = _elem_format("mx_quantize", elem_dtype)
    k = x.shape[-1]
    # contiguous: outputs must have the fake kernel's strides even for a transposed x (MX operands
    # of backward GEMMs are blocked along columns: Float8Linear quantizes x.t())
    xf = F.pad(x.to(torch.float32), (0, _padded_len(k, block_size) - k)).contiguous()
    blocks = xf.unflatten(-1, (-1, block_size))  # [..., nb, bs]
    scale = _block_exponent(blocks.abs().amax(dim=-1), fmt)  # [..., nb]
    # multiply by 2**-e (e = scale - 127): its biased code is 254 - scale, exact in fp32
    inv = _e8m0_to_fp32(torch.where(scale == E8M0_NAN, E8M0_BIAS, 2 * E8M0_BIAS - scale.to(torch.int32)))
    y = blocks * inv.unsqueeze(-1)
    y = torch.where((scale == E8M0_NAN).unsqueeze(-1), torch.zeros_like(y), y)
    y = torch.clamp(y, -fmt.max, fmt.max)
    return _encode(y.flatten(-2), fmt), scale


def _dequantize(
    qdata: Tensor, scale: Tensor, elem_dtype: str, block_size: int, last_dim: int, out_dtype: torch.dtype
) -> Tensor:
    fmt = _elem_format("mx_dequantize", elem_dtype)
    blocks = _decode(qdata, fmt).unflatten(-1, (-1, block_size)) * _e8m0_to_fp32(scale).unsqueeze(-1)
    return blocks.flatten(-2)[..., :last_dim].to(out_dtype).contiguous()


@torch.library.custom_op("fp8train::mx_quantize", mutates_args=())
def _mx_quantize_op(x: Tensor, elem_dtype: str, block_size: int) -> tuple[Tensor, Tensor]:
    """x [..., K] → (qdata [..., Kp // packed_per_byte], scale_e8m0 uint8 [..., Kp // block_size])."""
    return _quantize(x, elem_dtype, block_size)


@_mx_quantize_op.register_fake
def _(x: Tensor, elem_dtype: str, block_size: int) -> tuple[Tensor, Tensor]:
    fmt = _elem_format("mx_quantize", elem_dtype)
    kp = _padded_len(x.shape[-1], block_size)
    lead = tuple(x.shape[:-1])
    qdata = x.new_empty(lead + (kp // fmt.packed_per_byte,), dtype=fmt.storage_dtype)
    return qdata, x.new_empty(lead + (kp // block_size,), dtype=torch.uint8)


@torch.library.custom_op("fp8train::mx_dequantize", mutates_args=())
def _mx_dequantize_op(
    qdata: Tensor, scale_e8m0: Tensor, elem_dtype: str, block_size: int, last_dim: int, out_dtype: torch.dtype
) -> Tensor:
    """(qdata, scale_e8m0) → values [..., last_dim] in ``out_dtype`` (padding dropped)."""
    return _dequantize(qdata, scale_e8m0, elem_dtype, block_size, last_dim, out_dtype)


@_mx_dequantize_op.register_fake
def _(
    qdata: Tensor, scale_e8m0: Tensor, elem_dtype: str, block_size: int, last_dim: int, out_dtype: torch.dtype
) -> Tensor:
    return qdata.new_empty(tuple(qdata.shape[:-1]) + (last_dim,), dtype=out_dtype)


@torch.library.custom_op("fp8train::mx_fake_quantize", mutates_args=())
def _mx_fake_quantize_op(x: Tensor, elem_dtype: str, block_size: int) -> Tensor:
    """Quantize-dequantize: the values an MX GEMM would see, in ``x``'s dtype and shape."""
    qdata, scale = _quantize(x, elem_dtype, block_size)
    return _dequantize(qdata, scale, elem_dtype, block_size, x.shape[-1], x.dtype)


@_mx_fake_quantize_op.register_fake
def _(x: Tensor, elem_dtype: str, block_size: int) -> Tensor:
    return x.new_empty(x.shape)


def _straight_through(ctx: object, grad: Tensor) -> tuple[Tensor, None, None]:
    return grad, None, None


torch.library.register_autograd("fp8train::mx_fake_quantize", _straight_through)


# --- the tensor ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class MXTensor:
    """MX payload of a high-precision tensor: elements, shared E8M0 scales, and how to undo padding.

    Attributes:
        qdata: elements, ``[..., Kp]`` (fp4: ``[..., Kp // 2]``); dtype per ``elem_dtype`` (see the
            module docstring).
        scale_e8m0: biased block exponents, uint8 ``[..., Kp // block_size]`` (255 = NaN).
        elem_dtype: element format name, a key of ``MX_ELEM_DTYPES``.
        block_size: elements per block along the last dim.
        orig_shape: shape of the quantized tensor (last dim ``K <= Kp``).
        orig_dtype: dtype of the quantized tensor (what ``dequantize`` returns).

    Build one with ``to_mx``; the constructor checks that the pieces fit together.
    """

    qdata: Tensor
    scale_e8m0: Tensor
    elem_dtype: str
    block_size: int
    orig_shape: torch.Size
    orig_dtype: torch.dtype

    def __post_init__(self) -> None:
        fmt = _elem_format("MXTensor", self.elem_dtype)
        bs = _check_block_size("MXTensor", self.block_size)
        object.__setattr__(self, "orig_shape", torch.Size(self.orig_shape))
        if self.qdata.dtype != fmt.storage_dtype:
            raise ValueError(
                f"MXTensor: qdata.dtype={self.qdata.dtype} is invalid for elem_dtype={self.elem_dtype!r}; "
                f"valid: {fmt.storage_dtype}"
            )
        if self.scale_e8m0.dtype != torch.uint8:
            raise ValueError(f"MXTensor: scale_e8m0.dtype={self.scale_e8m0.dtype} is invalid; valid: torch.uint8")
        if len(self.orig_shape) == 0:
            raise ValueError("MXTensor: orig_shape=() is invalid; valid: at least one dim")
        kp = _padded_len(self.orig_shape[-1], bs)
        lead = tuple(self.orig_shape[:-1])
        expected = {
            "qdata": lead + (kp // fmt.packed_per_byte,),
            "scale_e8m0": lead + (kp // bs,),
        }
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"MXTensor: {name}.shape={tuple(getattr(self, name).shape)} does not fit "
                    f"orig_shape={tuple(self.orig_shape)} with block_size={bs}; valid: {shape}"
                )

    @property
    def format(self) -> MXElemFormat:
        return MX_ELEM_DTYPES[self.elem_dtype]

    @property
    def shape(self) -> torch.Size:
        return self.orig_shape

    @property
    def nbytes(self) -> int:
        """Bytes of payload plus scales (padding included)."""
        return self.qdata.nbytes + self.scale_e8m0.nbytes

    def to_dtype(self, dtype: torch.dtype) -> Tensor:
        """Dequantize to ``dtype``: ``orig_shape``, padding removed, NaN-scaled blocks all NaN."""
        return torch.ops.fp8train.mx_dequantize(
            self.qdata, self.scale_e8m0, self.elem_dtype, self.block_size, self.orig_shape[-1], dtype
        )

    def dequantize(self) -> Tensor:
        """Dequantize to ``orig_dtype``."""
        return self.to_dtype(self.orig_dtype)

    def elements(self) -> Tensor:
        """fp32 element values without their block scale, ``[..., Kp]`` (padding included)."""
        return _decode(self.qdata, self.format)

    def __repr__(self) -> str:
        return (
            f"MXTensor(shape={tuple(self.orig_shape)}, elem_dtype={self.elem_dtype!r}, "
            f"block_size={self.block_size}, orig_dtype={self.orig_dtype}, "
            f"blocks={self.scale_e8m0.numel()}, device={self.qdata.device.type})"
        )


# --- public functions ---------------------------------------------------------------------------------
def to_mx(x: Tensor, elem_dtype: str = "fp8_e4m3", block_size: int = STANDARD_BLOCK_SIZE) -> MXTensor:
    """Quantize ``x`` to MX along its last dim.

    Args:
        x: ``[..., K]`` fp32 / bf16 / fp16 / fp64 tensor with at least one dim. Not differentiated
            through (the payload has no gradient); use ``mx_fake_quantize`` for training.
        elem_dtype: element format, one of ``MX_ELEM_DTYPES``.
        block_size: elements per shared scale, a power of two in [2, 256]; 32 is the OCP standard.

    Returns:
        An ``MXTensor``; ``K`` is zero-padded to a multiple of ``block_size``.

    Raises:
        ValueError: bad ``elem_dtype`` / ``block_size``, a 0-dim ``x``, or a non-float dtype.

    Example:
        >>> to_mx(torch.ones(2, 64)).scale_e8m0   # amax 1 → e = 0 - 8 → biased 119
        tensor([[119, 119],
                [119, 119]], dtype=torch.uint8)
    """
    fmt = _elem_format("to_mx", elem_dtype)
    block_size = _check_block_size("to_mx", block_size)
    x = _check_input("to_mx", x)
    qdata, scale = torch.ops.fp8train.mx_quantize(x.detach(), fmt.name, block_size)
    return MXTensor(qdata, scale, fmt.name, block_size, x.shape, x.dtype)


def mx_fake_quantize(x: Tensor, elem_dtype: str = "fp8_e4m3", block_size: int = STANDARD_BLOCK_SIZE) -> Tensor:
    """``to_mx(x).dequantize()`` with a straight-through gradient (``d out / d x := I``).

    Args:
        x: ``[..., K]`` float tensor (at least one dim), blocked along the last dim.
        elem_dtype, block_size: as in ``to_mx``.

    Returns:
        Tensor of ``x``'s shape and dtype holding the values an MX GEMM would multiply.
    """
    fmt = _elem_format("mx_fake_quantize", elem_dtype)
    block_size = _check_block_size("mx_fake_quantize", block_size)
    x = _check_input("mx_fake_quantize", x)
    return torch.ops.fp8train.mx_fake_quantize(x, fmt.name, block_size)


def _fq_along(t: Tensor, dim: int, elem_dtype: str, block_size: int) -> Tensor:
    """MX quantize-dequantize of a 2-D ``t`` with blocks along ``dim`` (a GEMM's inner dim)."""
    if dim in (-1, 1):
        return torch.ops.fp8train.mx_fake_quantize(t, elem_dtype, block_size)
    return torch.ops.fp8train.mx_fake_quantize(t.t(), elem_dtype, block_size).t()


class _MXLinearFn(torch.autograd.Function):
    """``input @ weight.T`` with every GEMM operand MX-quantized along that GEMM's inner dim.

    ``input`` is 2-D ``[M, K]``, ``weight`` ``[N, K]``. With ``grad_elem_dtype=None`` the backward
    GEMMs run in high precision on the forward's quantized operands (straight-through).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        elem_dtype: str,
        block_size: int,
        grad_elem_dtype: str | None,
    ) -> Tensor:
        # GEMM 1: output = input @ weight.T      [M,K] @ [K,N] -> [M,N], blocks along K
        xq = _fq_along(x, -1, elem_dtype, block_size)
        wq = _fq_along(weight, -1, elem_dtype, block_size).to(x.dtype)
        if grad_elem_dtype is None:
            ctx.save_for_backward(xq, wq)
        else:
            ctx.save_for_backward(x, weight)
        ctx.cfg = (elem_dtype, block_size, grad_elem_dtype, weight.dtype)
        return xq @ wq.t()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_saved, w_saved = ctx.saved_tensors  # type: ignore[attr-defined]
        elem_dtype, block_size, grad_elem_dtype, w_dtype = ctx.cfg  # type: ignore[attr-defined]
        if grad_elem_dtype is None:
            go_gi = go_gw = grad_out
            w_gi, x_gw = w_saved, x_saved
        else:
            go_gi = _fq_along(grad_out, -1, grad_elem_dtype, block_size)  # blocks along N
            go_gw = _fq_along(grad_out, 0, grad_elem_dtype, block_size)  # blocks along M
            w_gi = _fq_along(w_saved, 0, elem_dtype, block_size).to(grad_out.dtype)  # along N
            x_gw = _fq_along(x_saved, 0, elem_dtype, block_size)  # along M
        # GEMM 2: grad_input = grad_output @ weight      [M,N] @ [N,K] -> [M,K]
        grad_x = go_gi @ w_gi if ctx.needs_input_grad[0] else None
        # GEMM 3: grad_weight = grad_output.T @ input    [N,M] @ [M,K] -> [N,K]
        grad_w = (go_gw.t() @ x_gw).to(w_dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None, None


def mx_linear(
    input: Tensor,
    weight: Tensor,
    elem_dtype: str = "fp8_e4m3",
    block_size: int = STANDARD_BLOCK_SIZE,
    *,
    bias: Tensor | None = None,
    grad_elem_dtype: str | None = None,
) -> Tensor:
    """Emulated MX GEMM, ``F.linear`` semantics: quantize, dequantize, multiply in ``input.dtype``.

    Args:
        input: ``[..., K]`` activations; the GEMMs run in its dtype.
        weight: ``[N, K]``.
        elem_dtype, block_size: element format and block size of ``input`` and ``weight``, both
            blocked along ``K`` for the forward GEMM.
        bias: optional ``[N]``, added in high precision.
        grad_elem_dtype: ``None`` (default): the backward GEMMs run in high precision on the
            forward's quantized operands (straight-through). A format name (e.g. ``"fp8_e5m2"``):
            emulate MX backward GEMMs too; grad_output is quantized to it, and every operand of
            grad_input / grad_weight is re-blocked along that GEMM's inner dim (N / M) from the
            high-precision tensors, as MX hardware needs.

    Returns:
        ``[..., N]`` in ``input.dtype``.

    Example:
        >>> mx_linear(torch.randn(8, 64), torch.randn(16, 64)).shape
        torch.Size([8, 16])
    """
    fmt = _elem_format("mx_linear", elem_dtype)
    block_size = _check_block_size("mx_linear", block_size)
    if grad_elem_dtype is not None:
        grad_elem_dtype = _elem_format("mx_linear (grad_elem_dtype)", grad_elem_dtype).name
    _check_input("mx_linear", input, "input")
    _check_input("mx_linear", weight, "weight")
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise ValueError(
            f"mx_linear: weight.shape={tuple(weight.shape)} is invalid for input.shape={tuple(input.shape)}; "
            f"valid: (out_features, {input.shape[-1]})"
        )
    out = _MXLinearFn.apply(input.reshape(-1, input.shape[-1]), weight, fmt.name, block_size, grad_elem_dtype)
    out = out.reshape(*input.shape[:-1], weight.shape[0])
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out


"""AdamWFp8's update as one Triton kernel (CUDA): every byte read and written once.

``torch.compile`` of the update (``fp8train.optim._update_rows``) turns it into several kernels
per parameter: the blockwise amax of the new moments is a reduction that inductor schedules
apart from the elementwise work, so the inputs are read more than once. Here one program takes
``TILE`` blocks of ``block`` elements (a block never crosses a row), keeps them in registers from
load to store and reduces each block's amax in place::

    reads    p (4 B, fp32 master)  g (4 B)  m (1 B + scale)  v (2 B bf16, or 1 B + scale)
    writes   p (4 B)                        m (1 B + scale)  v (2 B, or 1 B + scale)

about 18 bytes per parameter against fused AdamW's 28 (16 for fp8 v).

The arithmetic is ``_update_rows``' in the same order, fp32 throughout, IEEE-rounded square root
and division; results agree with the torch path except where a last-bit difference moves a value
across an fp8/bf16 rounding boundary (tested on GPU). Stochastic rounding draws its bits from
Philox (``tl.rand``) seeded by ``torch.randint`` on the parameter's
device (torch's default generator: ``torch.manual_seed`` makes runs repeatable; no host sync).

Triton is optional: ``available()`` says whether it is installed, ``supports(device)`` whether
the kernel runs on a device (NVIDIA, compute capability 8.9+: Triton's e4m3 conversion needs it).
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs; AdamWFp8 then uses its torch path
    triton = None

__all__ = ["MAX_BLOCK", "available", "fits", "supports", "adamw_fp8_update_"]

E4M3_MAX = 448.0
_MIN_AMAX = 1e-30
# elements per program: enough in flight per SM to saturate HBM, few enough to stay in registers
_ELEMENTS_PER_PROGRAM = 2048
#: the most elements of one block (of one row, when the block is wider) a program holds
MAX_BLOCK = 8192


def available() -> bool:
    """True when Triton is importable (see ``supports`` for the device)."""
    return triton is not None


def supports(device: torch.device) -> bool:
    """True when the kernel runs on ``device``: Triton installed, an NVIDIA GPU of compute
    capability 8.9 or newer (Ada, Hopper, Blackwell; an A100 has no e4m3 conversion)."""
    return available() and device.type == "cuda" and torch.version.hip is None and _capability(device) >= (8, 9)


def fits(cols: int, block: int) -> bool:
    """True when rows of ``cols`` elements with scales per ``block`` suit the kernel: a block (or
    the row, if narrower) of at most ``MAX_BLOCK`` elements, and int32 offsets within a chunk."""
    return min(block, cols) <= MAX_BLOCK and cols < 2**30


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


if triton is not None:

    @triton.jit
    def _quantize(x, inv_rand, STOCHASTIC: tl.constexpr):
        """``[TILE, BLOCK]`` fp32 -> (e4m3 values, ``[TILE]`` fp32 dequantization scales)."""
        amax = tl.max(tl.abs(x), axis=1)
        nonzero = amax > 1e-30
        inv = tl.where(nonzero, tl.div_rn(448.0, tl.maximum(amax, 1e-30)), 0.0)
        y = x * inv[:, None]
        if STOCHASTIC:
            # one e4m3 ulp of y, from its fp32 exponent (subnormals: 2**-9), times uniform(-0.5, 0.5)
            exponent = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
            ulp_exp = tl.maximum(exponent - 3, -9)
            ulp = ((ulp_exp + 127) << 23).to(tl.float32, bitcast=True)
            y = y + (inv_rand - 0.5) * ulp
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        return y.to(tl.float8e4nv), tl.where(nonzero, tl.div_rn(amax, 448.0), 0.0)

    @triton.jit(do_not_specialize=["seed_index"])
    def _adamw_fp8_kernel(
        p_ptr, g_ptr, m_ptr, ms_ptr, v_ptr, vs_ptr, seed_ptr, seed_index,
        n_blocks, nblk, cols, numel, p_stride, g_stride, m_stride, ms_stride, v_stride, vs_stride,
        decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
        BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr, TILE: tl.constexpr, FLAT: tl.constexpr,
        V_FP8: tl.constexpr, STOCHASTIC: tl.constexpr,
    ):
        b = tl.program_id(0) * TILE + tl.arange(0, TILE)  # block ids, row-major over [rows, nblk]
        j = tl.arange(0, BLOCK_P2)
        bmask = b < n_blocks
        if FLAT:
            # every operand contiguous, rows made of whole blocks of a power-of-two size: block b is
            # elements [b * BLOCK, (b + 1) * BLOCK) of each, its scale element b. The compiler sees
            # the offsets' contiguity, so loads and stores are vectorized (16 bytes per thread)
            lin = b[:, None] * BLOCK + j[None, :]
            mask = bmask[:, None]
            p_off, g_off, m_off, v_off = lin, lin, lin, lin
            ms_off, vs_off = b, b
        else:
            row = b // nblk
            blk = b % nblk
            col = blk[:, None] * BLOCK + j[None, :]
            mask = bmask[:, None] & (j[None, :] < BLOCK) & (col < cols)
            r = row[:, None]
            lin = r * cols + col
            p_off, g_off, m_off, v_off = r * p_stride + col, r * g_stride + col, r * m_stride + col, r * v_stride + col
            ms_off, vs_off = row * ms_stride + blk, row * vs_stride + blk

        g = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        m_scale = tl.load(ms_ptr + ms_off, mask=bmask, other=0.0)
        m = tl.load(m_ptr + m_off, mask=mask, other=0.0).to(tl.float32) * m_scale[:, None]
        m = m + (g - m) * one_minus_beta1
        if V_FP8:  # sqrt(v) stored
            v_scale = tl.load(vs_ptr + vs_off, mask=bmask, other=0.0)
            v = tl.load(v_ptr + v_off, mask=mask, other=0.0).to(tl.float32) * v_scale[:, None]
            v = v * v
        else:
            v = tl.load(v_ptr + v_off, mask=mask, other=0.0).to(tl.float32)
        v = v * beta2 + g * (g * one_minus_beta2)

        if STOCHASTIC:
            seed = tl.load(seed_ptr + seed_index)
            rand_m = tl.rand(seed, lin)
            rand_v = tl.rand(seed, lin + numel)  # a second, disjoint Philox stream
        else:
            rand_m = 0.0
            rand_v = 0.0
        m8, m_scale = _quantize(m, rand_m, STOCHASTIC)
        tl.store(m_ptr + m_off, m8, mask=mask)
        tl.store(ms_ptr + ms_off, m_scale, mask=bmask)
        if V_FP8:
            v8, v_scale = _quantize(tl.sqrt_rn(v), rand_v, STOCHASTIC)
            tl.store(v_ptr + v_off, v8, mask=mask)
            tl.store(vs_ptr + vs_off, v_scale, mask=bmask)
        elif STOCHASTIC:  # add 16 random low bits, then truncate: the bf16 cast below is exact
            noise = (rand_v * 65536.0).to(tl.int32)
            bits = (v.to(tl.int32, bitcast=True) + noise) & -65536
            tl.store(v_ptr + v_off, bits.to(tl.float32, bitcast=True).to(tl.bfloat16), mask=mask)
        else:
            tl.store(v_ptr + v_off, v.to(tl.bfloat16), mask=mask)

        # this step's update uses the fp32 moments; the rounded ones carry over to the next step
        update = tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps) * step_size
        p_in = tl.load(p_ptr + p_off, mask=mask, other=0.0)
        p_new = p_in.to(tl.float32) * decay - update
        tl.store(p_ptr + p_off, p_new.to(p_in.dtype), mask=mask)


def adamw_fp8_update_(
    p: torch.Tensor, g: torch.Tensor, m8: torch.Tensor, m_scale: torch.Tensor, v_store: torch.Tensor,
    v_scale: torch.Tensor | None, *, decay: float, one_minus_beta1: float, beta2: float, one_minus_beta2: float,
    step_size: float, bc2_sqrt: float, eps: float, block: int, stochastic: bool,
    seeds: torch.Tensor | None = None, seed_index: int = 0,
) -> None:
    """One AdamW step of ``[rows, C]`` views, in place (same contract as ``fp8train.optim._update_rows``).

    Args:
        p: parameter rows (fp32 or bf16), last dimension contiguous.
        g: gradient rows (any float dtype).
        m8, m_scale: first moment, e4m3 ``[rows, C]`` and fp32 ``[rows, ceil(C / block)]``.
        v_store, v_scale: second moment, bf16 (``v_scale`` None) or sqrt(v) in e4m3 with scales.
        decay: ``1 - lr * weight_decay``; step_size: ``lr / (1 - beta1**t)``; bc2_sqrt: ``sqrt(1 - beta2**t)``.
        block: elements per scale along a row.
        stochastic: stochastic rounding of the stored moments.
        seeds, seed_index: int64 device tensor of Philox seeds, and which one this launch uses
            (several launches share one draw); ``None``: one seed is drawn from the device's
            generator for this launch.
    """
    rows, cols = p.shape
    nblk = -(-cols // block)
    v8 = v_scale is not None
    checks = (
        (g.shape == p.shape and m8.shape == p.shape and v_store.shape == p.shape, "g, m8, v_store shaped like p"),
        (tuple(m_scale.shape) == (rows, nblk) and (not v8 or tuple(v_scale.shape) == (rows, nblk)),
         f"scales of shape ({rows}, ceil({cols} / block={block})) = ({rows}, {nblk})"),
        (m8.dtype == torch.float8_e4m3fn and v_store.dtype == (torch.float8_e4m3fn if v8 else torch.bfloat16)
         and m_scale.dtype == torch.float32 and (not v8 or v_scale.dtype == torch.float32),
         "e4m3 m8, bf16 v_store (e4m3 with v_scale), fp32 scales"),
        (all(t.stride(-1) == 1 for t in (p, g, m8, v_store, m_scale) + ((v_scale,) if v8 else ())),
         "every operand's last dimension contiguous"),
        (fits(cols, block), f"min(block, C) <= {MAX_BLOCK} and C < 2**30"),
    )
    for ok, want in checks:
        if not ok:
            raise ValueError(f"adamw_fp8_update_: p {tuple(p.shape)}, block={block}: needs {want}")
    if rows == 0 or cols == 0:
        return
    tensors = (p, g, m8, v_store)
    block_p2 = triton.next_power_of_2(min(block, cols))
    tile = max(1, _ELEMENTS_PER_PROGRAM // block_p2)
    n_blocks = rows * nblk
    if stochastic and seeds is None:  # from the device's generator (a device tensor: no host sync)
        seeds, seed_index = torch.randint(0, 2**63 - 1, (1,), device=p.device, dtype=torch.int64), 0
    seed = seeds if stochastic else m_scale  # never read without STOCHASTIC
    vs = v_scale if v_scale is not None else m_scale  # never read without V_FP8
    flat = block == block_p2 and cols % block == 0 and all(t.is_contiguous() for t in (*tensors, m_scale, vs))
    grid = (triton.cdiv(n_blocks, tile),)
    _adamw_fp8_kernel[grid](
        p, g, m8, m_scale, v_store, vs, seed, seed_index,
        n_blocks, nblk, cols, rows * cols, p.stride(0), g.stride(0), m8.stride(0), m_scale.stride(0), v_store.stride(0),
        vs.stride(0),
        decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
        BLOCK=block, BLOCK_P2=block_p2, TILE=tile, FLAT=flat, V_FP8=v_scale is not None, STOCHASTIC=stochastic,
        num_warps=8,
    )

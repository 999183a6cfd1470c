"""SwiGLU and its backward fused with the fp8 casts of their results (Triton, CUDA).

In a SwiGLU feed-forward ``y = W2 @ (silu(h1) * h3)`` with ``h1 = W1 x``, ``h3 = W3 x``, the
element-wise part sits between fp8 GEMMs, so each of its results is cast to fp8 right away::

    pass       reads (bf16, [M, F])   writes (fp8, [M, F] and/or its transpose [F, M])
    forward    h1, h3                 g = silu(h1) * h3 row-major      (left operand of y = g @ W2.T)
    backward   dg, h1, h3             dh1, dh3 row-major               (left operands of dx = dh @ W)
                                      dh1, dh3 transposed              (dW1 = dh1.T @ x, dW3 = dh3.T @ x)
                                      g transposed (recomputed)        (dW2 = dy.T @ g)

with ``dh1 = dg * h3 * silu'(h1)``, ``dh3 = dg * silu(h1)``, ``silu'(a) = s (1 + a (1 - s))`` and
``s = sigmoid(a)``. Each pass is one kernel that reads its inputs once from HBM in tiles and writes
every fp8 layout asked for (the backward re-reads each tile from L2 for the transposed layouts; see
the kernel), plus each tile's amax (delayed scaling records the amax of what it casts
with a stored scale; dynamic scaling runs the same kernel once with ``store=False`` to get the
amax, then again to cast). Inductor fuses the same math into one kernel but writes the transposed
1-byte layouts without tiling them (2.7x the HBM roofline on an H200, ``docs/PERF_NOTES.md``
entry 16); ``g`` is recomputed in backward from ``h1, h3``, which backward reads anyway, rather than
saved.

The element-wise math is fp32 (``silu(a) = a * sigmoid(a)``); the casts are those of
``fp8train.scaling.saturated_cast`` (multiply by the scale, clamp to ±fp8 max, round to nearest
even). ``swiglu_reference`` / ``swiglu_backward_reference`` give the same values with torch ops
(CPU, and where Triton is missing). NaN handling follows ``fp8train.cast_kernel``: a NaN element
casts to NaN and makes its tile's amax infinite.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fp8train import cast_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference runs instead
    triton = None

__all__ = ["fits", "swiglu_cast", "swiglu_backward_cast", "swiglu_reference", "swiglu_backward_reference"]

# 64 x 128 tiles, 8 warps (H200, [16384 x 8192] bf16, scripts/diag/swiglu_kernels.py: forward 175 us,
# backward 527 us; 64x64/4 warps 190/555, 128x64/8 192/543, 32x128/4 177/541; inductor 429/818)
_BLOCK_M, _BLOCK_N, _WARPS = 64, 128, 8
_MAX_GRID_Y = 65535


def fits(a: torch.Tensor, *others: torch.Tensor) -> bool:
    """True when the kernels take ``a`` (and ``others`` alike): 2-D contiguous bf16/fp16/fp32 CUDA
    tensors of one shape and dtype on a device the kernels run on, fewer than 2**31 elements."""
    if a.dim() != 2 or a.dtype not in (torch.bfloat16, torch.float16, torch.float32) or not a.is_contiguous():
        return False
    if any(o.shape != a.shape or o.dtype != a.dtype or not o.is_contiguous() or o.device != a.device for o in others):
        return False
    return a.numel() < 2**31 and -(-a.shape[1] // _BLOCK_N) <= _MAX_GRID_Y and a.is_cuda and cast_kernel.supports(a.device)


def swiglu_reference(h1: torch.Tensor, h3: torch.Tensor) -> torch.Tensor:
    """``silu(h1) * h3`` in fp32 (the values the forward kernel casts)."""
    a = h1.to(torch.float32)
    return a * torch.sigmoid(a) * h3.to(torch.float32)


def swiglu_backward_reference(dg: torch.Tensor, h1: torch.Tensor, h3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dh1, dh3)`` of ``g = silu(h1) * h3`` for the gradient ``dg``, in fp32."""
    a, b, d = h1.to(torch.float32), h3.to(torch.float32), dg.to(torch.float32)
    s = torch.sigmoid(a)
    return d * b * s * (1 + a * (1 - s)), d * a * s


if triton is not None:

    @triton.jit
    def _store_fp8(ptrs, v, scale, mask, FP8_MAX: tl.constexpr):
        y = tl.clamp(v * scale, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        tl.store(ptrs, y.to(ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _tile_amax(v):
        a = tl.abs(v)
        a = tl.where(a == a, a, float("inf"))  # NaN -> inf: the max reduction would drop it
        return tl.max(tl.max(a, axis=1), axis=0)

    @triton.jit
    def _swiglu_fwd_kernel(
        a_ptr, b_ptr, scale_ptr, y_ptr, amax_ptr, rows, cols,
        FP8_MAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STORE: tl.constexpr, AMAX: tl.constexpr,
    ):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        r = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (r[:, None] < rows) & (c[None, :] < cols)
        offs = r[:, None] * cols + c[None, :]
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = a * tl.sigmoid(a) * b
        if STORE:
            _store_fp8(y_ptr + offs, g, tl.load(scale_ptr), mask, FP8_MAX)
        if AMAX:
            tl.store(amax_ptr + pid_m * tl.num_programs(1) + pid_n, _tile_amax(g))

    @triton.jit
    def _swiglu_grads(dg_ptr, a_ptr, b_ptr, offs, mask):
        d = tl.load(dg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)
        silu = a * s
        return d * b * s * (1 + a * (1 - s)), d * silu, silu * b

    @triton.jit
    def _swiglu_bwd_kernel(
        dg_ptr, a_ptr, b_ptr, scale_g_ptr, scale_da_ptr, scale_db_ptr,
        da_ptr, da_t_ptr, db_ptr, db_t_ptr, g_t_ptr, amax_da_ptr, amax_db_ptr, rows, cols,
        FP8_MAX_G: tl.constexpr, FP8_MAX_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        STORE_ROWS: tl.constexpr, STORE_T: tl.constexpr, G_T: tl.constexpr, AMAX: tl.constexpr,
    ):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        r = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        s_da, s_db = tl.load(scale_da_ptr), tl.load(scale_db_ptr)
        if STORE_ROWS or AMAX:
            mask = (r[:, None] < rows) & (c[None, :] < cols)
            da, db, _ = _swiglu_grads(dg_ptr, a_ptr, b_ptr, r[:, None] * cols + c[None, :], mask)
            if STORE_ROWS:
                _store_fp8(da_ptr + r[:, None] * cols + c[None, :], da, s_da, mask, FP8_MAX_D)
                _store_fp8(db_ptr + r[:, None] * cols + c[None, :], db, s_db, mask, FP8_MAX_D)
            if AMAX:
                tile = pid_m * tl.num_programs(1) + pid_n
                tl.store(amax_da_ptr + tile, _tile_amax(da))
                tl.store(amax_db_ptr + tile, _tile_amax(db))
        if STORE_T or G_T:
            # The transposed layouts come from a second read of the tile (an L2 hit: no extra HBM
            # traffic), indexed [column, row]. Stored from the tile computed above, Triton (as shipped
            # with torch 2.11, H200) wrote ~25% wrong bytes in the transposed layout whenever the same
            # tile was also stored row-major at 16-aligned shapes (every 4th column; a barrier, a
            # transpose in fp32 or int32, or an unvectorised row-major store did not help; two
            # launches were right but 1.7x slower). scripts/diag/swiglu_kernels.py checks both layouts.
            mask_t = (c[:, None] < cols) & (r[None, :] < rows)
            da, db, g = _swiglu_grads(dg_ptr, a_ptr, b_ptr, r[None, :] * cols + c[:, None], mask_t)
            offs_t = c[:, None].to(tl.int64) * rows + r[None, :]
            if STORE_T:
                _store_fp8(da_t_ptr + offs_t, da, s_da, mask_t, FP8_MAX_D)
                _store_fp8(db_t_ptr + offs_t, db, s_db, mask_t, FP8_MAX_D)
            if G_T:
                _store_fp8(g_t_ptr + offs_t, g, tl.load(scale_g_ptr), mask_t, FP8_MAX_G)

    def _grid(rows: int, cols: int) -> tuple[int, int]:
        return triton.cdiv(rows, _BLOCK_M), triton.cdiv(cols, _BLOCK_N)

    def _empty(shape: tuple[int, ...], want: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(shape if want else (0,), dtype=dtype, device=device)

    def _swiglu_fwd_impl(
        launch: Any, h1: torch.Tensor, h3: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, store: bool,
        amax: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = h1.shape
        grid = _grid(rows, cols)
        y = _empty((rows, cols), store, fp8_dtype, h1.device)
        partial = _empty((grid[0] * grid[1],), amax, torch.float32, h1.device)
        launch(_swiglu_fwd_kernel)[grid](
            h1, h3, scale, y, partial, rows, cols, FP8_MAX=float(torch.finfo(fp8_dtype).max),
            BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, STORE=store, AMAX=amax, num_warps=_WARPS,
        )
        return y, partial

    def _swiglu_bwd_impl(
        launch: Any, dg: torch.Tensor, h1: torch.Tensor, h3: torch.Tensor, scale_g: torch.Tensor,
        scale_dh1: torch.Tensor, scale_dh3: torch.Tensor, g_dtype: torch.dtype, grad_dtype: torch.dtype,
        rows_out: bool, transposed: bool, g_t: bool, amax: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, cols = h1.shape
        grid = _grid(rows, cols)
        dev = h1.device
        da, db = (_empty((rows, cols), rows_out, grad_dtype, dev) for _ in range(2))
        da_t, db_t = (_empty((cols, rows), transposed, grad_dtype, dev) for _ in range(2))
        gt = _empty((cols, rows), g_t, g_dtype, dev)
        pa, pb = (_empty((grid[0] * grid[1],), amax, torch.float32, dev) for _ in range(2))
        launch(_swiglu_bwd_kernel)[grid](
            dg, h1, h3, scale_g, scale_dh1, scale_dh3, da, da_t, db, db_t, gt, pa, pb, rows, cols,
            FP8_MAX_G=float(torch.finfo(g_dtype).max), FP8_MAX_D=float(torch.finfo(grad_dtype).max),
            BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, STORE_ROWS=rows_out, STORE_T=transposed, G_T=g_t, AMAX=amax,
            num_warps=_WARPS,
        )
        return da, da_t, db, db_t, gt, pa, pb

    # Each kernel as an op ``torch.compile`` keeps in its graph, and launched directly for eager code
    # (where the op's dispatch and ``wrap_triton``'s eager path add host time: PERF_NOTES entry 22).
    @torch.library.triton_op("fp8train::swiglu_cast", mutates_args=())
    def _swiglu_fwd_op(
        h1: torch.Tensor, h3: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, store: bool, amax: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _swiglu_fwd_impl(torch.library.wrap_triton, h1, h3, scale, fp8_dtype, store, amax)

    @torch.library.triton_op("fp8train::swiglu_backward_cast", mutates_args=())
    def _swiglu_bwd_op(
        dg: torch.Tensor, h1: torch.Tensor, h3: torch.Tensor, scale_g: torch.Tensor, scale_dh1: torch.Tensor,
        scale_dh3: torch.Tensor, g_dtype: torch.dtype, grad_dtype: torch.dtype, rows_out: bool, transposed: bool,
        g_t: bool, amax: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _swiglu_bwd_impl(torch.library.wrap_triton, dg, h1, h3, scale_g, scale_dh1, scale_dh3, g_dtype,
                                grad_dtype, rows_out, transposed, g_t, amax)


def _fwd(
    h1: torch.Tensor, h3: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, store: bool, amax: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel, launched directly in plain eager code, through its op where traced."""
    if cast_kernel.launches_directly(h1, h3, scale):
        return _swiglu_fwd_impl(cast_kernel._direct, h1, h3, scale, fp8_dtype, store, amax)
    return _swiglu_fwd_op(h1, h3, scale, fp8_dtype, store, amax)


def _bwd(
    dg: torch.Tensor, h1: torch.Tensor, h3: torch.Tensor, scale_g: torch.Tensor, scale_dh1: torch.Tensor,
    scale_dh3: torch.Tensor, g_dtype: torch.dtype, grad_dtype: torch.dtype, rows_out: bool, transposed: bool,
    g_t: bool, amax: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernel, launched directly in plain eager code, through its op where traced."""
    args = (dg, h1, h3, scale_g, scale_dh1, scale_dh3, g_dtype, grad_dtype, rows_out, transposed, g_t, amax)
    if cast_kernel.launches_directly(dg, h1, h3, scale_g, scale_dh1, scale_dh3):
        return _swiglu_bwd_impl(cast_kernel._direct, *args)
    return _swiglu_bwd_op(*args)


def _check(*tensors: torch.Tensor) -> None:
    if not fits(*tensors):
        shapes = ", ".join(f"{tuple(t.shape)} {t.dtype} contiguous={t.is_contiguous()} on {t.device}" for t in tensors)
        raise ValueError(
            f"fp8train.swiglu_kernel: inputs {shapes}: need 2-D contiguous bf16/fp16/fp32 tensors of one shape "
            f"and dtype with < 2**31 elements, on an NVIDIA GPU of compute capability 8.9+ with Triton (fits())"
        )


def _f32(scale: torch.Tensor) -> torch.Tensor:
    return scale.to(torch.float32).reshape(())


def swiglu_cast(
    h1: torch.Tensor, h3: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, *, store: bool = True,
    amax: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``saturated_cast(silu(h1) * h3, scale, dtype)`` row-major, from one read of ``h1`` and ``h3``.

    Args:
        h1, h3: ``[M, F]`` gate and up projections (see ``fits``).
        scale: 0-dim fp32 multiplier applied before the cast (ignored when ``store=False``).
        dtype: fp8 dtype of the result.
        store: write the fp8 result (``False``: only the amax, for dynamic scaling's first pass).
        amax: return max|silu(h1) * h3| as a 0-dim fp32 tensor (inf where a value is NaN or inf).

    Returns:
        ``(g8 [M, F] or None, amax or None)``.
    """
    _check(h1, h3)
    y, partial = _fwd(h1, h3, _f32(scale), dtype, store, amax)
    return (y if store else None), (partial.amax() if amax else None)


def swiglu_backward_cast(
    dg: torch.Tensor, h1: torch.Tensor, h3: torch.Tensor, *, scale_g: torch.Tensor, scale_dh1: torch.Tensor,
    scale_dh3: torch.Tensor, g_dtype: torch.dtype, grad_dtype: torch.dtype, rows: bool = True,
    transposed: bool = True, g_transposed: bool = True, amax: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """The SwiGLU backward and the fp8 casts of its results, from one read of ``dg, h1, h3``.

    Args:
        dg: ``[M, F]`` gradient of ``g = silu(h1) * h3``; ``h1, h3`` as in the forward.
        scale_g: the forward's scale of ``g`` (the recomputed ``g`` casts to the forward's bytes).
        scale_dh1, scale_dh3: multipliers of the two gradients' casts.
        g_dtype, grad_dtype: fp8 dtypes of ``g`` and of the gradients.
        rows / transposed: write ``dh1, dh3`` row-major ``[M, F]`` / transposed ``[F, M]``.
        g_transposed: write ``g`` transposed ``[F, M]``.
        amax: return max|dh1| and max|dh3| (0-dim fp32). With nothing to write, only these.

    Returns:
        ``(dh1, dh1_t, dh3, dh3_t, g_t, amax_dh1, amax_dh3)``, ``None`` for what was not asked for.
    """
    _check(dg, h1, h3)
    da, da_t, db, db_t, gt, pa, pb = _bwd(
        dg, h1, h3, _f32(scale_g), _f32(scale_dh1), _f32(scale_dh3), g_dtype, grad_dtype, rows, transposed,
        g_transposed, amax,
    )

    def want(t: torch.Tensor, flag: bool) -> torch.Tensor | None:
        return t if flag else None

    return (want(da, rows), want(da_t, transposed), want(db, rows), want(db_t, transposed), want(gt, g_transposed),
            pa.amax() if amax else None, pb.amax() if amax else None)

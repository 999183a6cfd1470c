"""Tensorwise fp8 cast as one Triton kernel (CUDA): both layouts and the amax from one read.

A Float8Linear needs each operand in fp8 in two memory layouts: row-major for one GEMM and its
transpose for another (``_scaled_mm`` wants its left operand row-major and its right one
column-major)::

    operand        [rows, cols]   row-major for              transposed ([cols, rows]) for
    input x        [M, K]         output     x8 @ W8.T       grad_weight  dy8.T @ x8
    weight W       [N, K]         output     x8 @ W8.T       grad_input   dy8 @ W8
    grad_output dy [M, N]         grad_input dy8 @ W8        grad_weight  dy8.T @ x8

``cast_transpose`` reads the high-precision tensor once in tiles and writes whichever layouts are
asked for, plus each tile's max(|x|) when asked (delayed scaling records the amax of the operand
it casts with a stored scale, so one pass does both). Per element: 2 bytes read (bf16), 1 byte
written per layout, against inductor's separate amax reduction and a cast kernel whose transposed
1-byte stores it does not tile (``docs/PERF_NOTES.md``, entry 15).

The values are those of ``fp8train.scaling.saturated_cast`` (fp32 multiply, clamp to ±fp8 max,
round to nearest even), bit for bit (tested on GPU). A NaN element gives a NaN fp8 value and an
infinite tile amax (Triton's max reductions drop NaN; an infinite amax makes the delayed-scaling
sync skip the step just as a NaN one does).

``cast_group`` casts a list of tensors, each with its own scale, in one launch (FSDP2's weight
shards after an optimizer step: ``fp8train.fsdp``).

The op is a ``torch.library.triton_op``, so ``torch.compile`` keeps it in the graph (no graph
break) and launches the kernel from the compiled code; plain eager code launches the kernel
directly (``launches_directly``: the op's eager dispatch added ~40 us of host time per call,
``docs/PERF_NOTES.md`` entry 22). Triton is optional: ``supports(device)`` says whether the kernel
runs on a device (that of ``fp8train.optim_kernel``: NVIDIA, compute capability 8.9+, where Triton
has fp8 conversions).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fp8train import optim_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: casts take the torch path
    triton = None

__all__ = ["supports", "fits", "cast_transpose", "cast_with_stored_scale", "cast_group"]

# a tile per program: 64 x 128 bf16 = 16 KiB read, enough in flight per SM to keep HBM busy
# (chosen by scripts/diag/cast_kernels.py on an H200: PERF_NOTES entry 15)
_BLOCK_M, _BLOCK_N, _WARPS = 64, 128, 8
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension (the column tiles)
# cast_group: a 1-D block of 4096 elements per program (16 KiB of fp32, as the 2-D tile above reads
# of bf16), and at most 1024 tensors per launch (each program scans their tile table)
_GROUP_BLOCK, _GROUP_WARPS, _GROUP_MAX = 4096, 4, 1024


@torch.compiler.assume_constant_result  # traced as a constant: no graph break for the device query
def supports(device: torch.device) -> bool:
    """True when the kernel runs on ``device`` (Triton installed, NVIDIA compute capability 8.9+)."""
    return optim_kernel.supports(device)


def fits(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when ``x`` and ``dtype`` suit the kernel: a 2-D bf16/fp16/fp32 CUDA tensor on a supported
    device, cast to e4m3fn or e5m2, whose elements lie within 2**31 of its first (int32 input offsets)
    and whose column tiles fit CUDA's grid (at most 65535 x 128 columns)."""
    return _fits_shape(x, dtype) and x.is_cuda and supports(x.device)


def _fits_shape(x: torch.Tensor, dtype: torch.dtype) -> bool:
    if x.dim() != 2 or dtype not in _FP8 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    rows, cols = x.shape
    extent = (rows - 1) * x.stride(0) + (cols - 1) * x.stride(1) if x.numel() else 0
    return x.numel() < 2**31 and extent < 2**31 and -(-cols // _BLOCK_N) <= _MAX_GRID_Y


if triton is not None:

    @triton.jit
    def _cast_transpose_kernel(
        x_ptr, scale_ptr, y_ptr, yt_ptr, amax_ptr, scale_out_ptr, rows, cols, stride_r, stride_c,
        FP8_MAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        ROW_MAJOR: tl.constexpr, TRANSPOSED: tl.constexpr, AMAX: tl.constexpr,
        AMAX_ATOMIC: tl.constexpr, SCALE_OUT: tl.constexpr,  # no defaults: inductor wants every argument passed
    ):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        r = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (r[:, None] < rows) & (c[None, :] < cols)
        x = tl.load(x_ptr + r[:, None] * stride_r + c[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr)
        y = tl.clamp(x * scale, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL).to(y_ptr.dtype.element_ty)
        if ROW_MAJOR:
            tl.store(y_ptr + r[:, None] * cols + c[None, :], y, mask=mask)
        if TRANSPOSED:  # [cols, rows] row-major; Triton stages the tile through shared memory
            tl.store(yt_ptr + c[None, :].to(tl.int64) * rows + r[:, None], y, mask=mask)
        if AMAX:
            a = tl.abs(x)
            a = tl.where(a == a, a, float("inf"))  # NaN -> inf: the reduction below would drop it
            tile_amax = tl.max(tl.max(a, axis=1), axis=0)
            if AMAX_ATOMIC:  # straight into a running-max buffer: no second launch to reduce tiles
                tl.atomic_max(amax_ptr, tile_amax)
            else:
                tl.store(amax_ptr + pid_m * tl.num_programs(1) + pid_n, tile_amax)
        if SCALE_OUT:  # a copy of the scale used, taken in the same launch
            tl.store(scale_out_ptr, scale, mask=(pid_m == 0) & (pid_n == 0))

    @triton.jit
    def _cast_group_kernel(
        meta_ptr, scales_ptr, x0_ptr, y_ptr, n, FP8_MAX: tl.constexpr, N_POW2: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # meta (int64): n source addresses, n numels, n offsets into y, n cumulative tile counts
        pid = tl.program_id(0)
        i = tl.arange(0, N_POW2)
        ends = tl.load(meta_ptr + 3 * n + i, mask=i < n, other=2**62)
        t = tl.sum((ends <= pid).to(tl.int32), axis=0)  # the tensor this program's tile belongs to
        first = tl.load(meta_ptr + 3 * n + t - 1, mask=t > 0, other=0)
        x_ptr = tl.load(meta_ptr + t).to(tl.pointer_type(x0_ptr.dtype.element_ty))
        numel = tl.load(meta_ptr + n + t)
        dst = tl.load(meta_ptr + 2 * n + t)
        offs = (pid - first).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scales_ptr + t)
        y = tl.clamp(x * scale, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + dst + offs, y, mask=mask)

    def _cast_transpose_impl(
        launch: Any, x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, row_major: bool, transposed: bool,
        amax: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, cols = x.shape
        # Triton as shipped with torch 2.11 wrote wrong bytes (~25% of them, H200) in the transposed
        # store of a tile loaded as fp32 when the shape was 16-aligned and both layouts were written;
        # tiles loaded as bf16/fp16 are right (tests/test_cast_kernel.py). fp32 inputs (master
        # weights under autocast: small) get the transposed layout as a copy of the row-major result.
        copy_t = transposed and x.element_size() == 4
        write_rows, write_t = row_major or copy_t, transposed and not copy_t
        grid = (triton.cdiv(rows, _BLOCK_M), triton.cdiv(cols, _BLOCK_N))
        y = torch.empty((rows, cols) if write_rows else (0,), dtype=fp8_dtype, device=x.device)
        yt = torch.empty((cols, rows) if write_t else (0,), dtype=fp8_dtype, device=x.device)
        partial = torch.empty(grid[0] * grid[1] if amax else 0, dtype=torch.float32, device=x.device)
        launch(_cast_transpose_kernel)[grid](
            x, scale, y if write_rows else yt, yt if write_t else y, partial, scale,  # scale: SCALE_OUT's unused slot
            rows, cols, x.stride(0), x.stride(1),
            FP8_MAX=float(torch.finfo(fp8_dtype).max), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
            ROW_MAJOR=write_rows, TRANSPOSED=write_t, AMAX=amax, AMAX_ATOMIC=False, SCALE_OUT=False,
            num_warps=_WARPS,
        )
        if copy_t:  # clone, not contiguous(): an op's outputs must not alias (y.t() of one row is contiguous)
            yt = y.t().clone(memory_format=torch.contiguous_format)
        return y, yt, partial

    @torch.library.triton_op("fp8train::cast_transpose", mutates_args=())
    def _cast_transpose_op(
        x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, row_major: bool, transposed: bool, amax: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kernel as an op ``torch.compile`` keeps in its graph."""
        return _cast_transpose_impl(torch.library.wrap_triton, x, scale, fp8_dtype, row_major, transposed, amax)

    def _cast_transpose_eager(
        x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, row_major: bool, transposed: bool, amax: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same, launched directly: outside compiled code the op's dispatch and ``wrap_triton``'s
        eager path add host time to every call (PERF_NOTES entry 22)."""
        return _cast_transpose_impl(_direct, x, scale, fp8_dtype, row_major, transposed, amax)


def _direct(kernel: Any) -> Any:
    """A Triton kernel as itself (the eager counterpart of ``torch.library.wrap_triton``)."""
    return kernel


def launches_directly(*tensors: torch.Tensor) -> bool:
    """True in plain eager code, where a kernel is launched directly rather than through its op: not
    under ``torch.compile``'s tracing or ``torch.jit.trace``, no dispatch mode active (``make_fx``,
    ``FakeTensorMode``, export, AOTAutograd), and every tensor a plain tensor or parameter (not a
    subclass such as DTensor, not functionalized, not wrapped by ``vmap``/``grad``)."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or torch._C._get_tracing_state():
        return False
    return all(
        type(t) in _PLAIN and not torch._is_functional_tensor(t) and not _is_functorch_wrapped(t) for t in tensors
    )


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a Parameter of a subclass has the subclass's type
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def cast_transpose(
    x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, *, row_major: bool = True, transposed: bool = True,
    amax: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``saturated_cast(x, scale, dtype)`` in the layouts asked for, from one read of ``x``.

    Args:
        x: ``[rows, cols]`` bf16/fp16/fp32 CUDA tensor (any strides; see ``fits``).
        scale: 0-dim fp32 tensor on ``x``'s device, the multiplier applied before the cast.
        dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        row_major: return the fp8 tensor ``[rows, cols]``, row-major.
        transposed: return its transpose ``[cols, rows]``, row-major (the column-major layout of
            the same values: ``yt.t()`` equals ``y``).
        amax: return max(|x|) as a 0-dim fp32 tensor (inf where ``x`` has a NaN or inf).

    Returns:
        ``(y, yt, amax)``, ``None`` for what was not asked for.

    Raises:
        ValueError: ``x``/``dtype`` the kernel does not take (check ``fits`` first).
    """
    if not fits(x, dtype):
        raise ValueError(
            f"cast_transpose: x {tuple(x.shape)} {x.dtype} strides {x.stride()} on {x.device} -> {dtype}: needs a "
            f"2-D bf16/fp16/fp32 tensor spanning < 2**31 elements with <= {_MAX_GRID_Y * _BLOCK_N} columns, on "
            f"an NVIDIA GPU of compute capability 8.9+ with Triton installed, cast to one of {list(_FP8)} (fits())"
        )
    if not (row_major or transposed):
        raise ValueError("cast_transpose: row_major=False and transposed=False ask for nothing")
    scale = scale.to(torch.float32).reshape(())
    run = _cast_transpose_eager if launches_directly(x, scale) else _cast_transpose_op
    y, yt, partial = run(x, scale, dtype, row_major, transposed, amax)
    return y if row_major else None, yt if transposed else None, partial.amax() if amax else None


def cast_with_stored_scale(
    x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``saturated_cast(x, scale, dtype)`` row-major, for a cast outside compiled code with a stored
    (delayed-scaling) scale, in one kernel launch: the kernel also copies ``scale`` (the caller's
    buffer may be rewritten in place before the result is used) and, when ``amax`` is given, folds
    max(|x|) into it in place (``amax = max(amax, max|x|)``, atomically; inf where ``x`` has a NaN).
    The torch ops for the same would take five launches (copy, cast, tile reduction, maximum,
    copy back): host time on FSDP2's all-gather path (``docs/PERF_NOTES.md``, entry 22).

    Args:
        x: ``[rows, cols]`` tensor the kernel takes (``fits(x, dtype)``).
        scale: 0-dim fp32 tensor on ``x``'s device.
        dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        amax: 0-dim fp32 running-max buffer on ``x``'s device, or None.

    Returns:
        ``(y, scale_copy)``: ``y`` ``[rows, cols]`` fp8, ``scale_copy`` 0-dim fp32.

    Raises:
        ValueError: ``x``/``dtype``/``scale``/``amax`` the kernel does not take, or a context where
            the kernel cannot be launched directly (``launches_directly``: tracing, DTensors, ...).
    """
    if not fits(x, dtype):
        raise ValueError(f"cast_with_stored_scale: x {tuple(x.shape)} {x.dtype} on {x.device} -> {dtype} does not fit "
                         "the kernel (check fits() first)")
    for name, t in (("scale", scale), ("amax", amax)):
        if t is not None and (t.dtype != torch.float32 or t.numel() != 1 or t.device != x.device):
            raise ValueError(f"cast_with_stored_scale: {name} must be a one-element fp32 tensor on {x.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    if not launches_directly(x, scale, *([] if amax is None else [amax])):
        raise ValueError(
            f"cast_with_stored_scale: needs plain tensors in eager code (got {type(x).__name__}, "
            f"{type(scale).__name__}, {type(amax).__name__}; or something is tracing): use cast_transpose there"
        )
    rows, cols = x.shape
    y = torch.empty((rows, cols), dtype=dtype, device=x.device)
    if not x.numel():
        return y, scale.clone()
    scale_out = torch.empty((), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(rows, _BLOCK_M), triton.cdiv(cols, _BLOCK_N))
    _cast_transpose_kernel[grid](
        x, scale, y, y, scale_out if amax is None else amax, scale_out, rows, cols, x.stride(0), x.stride(1),
        FP8_MAX=float(torch.finfo(dtype).max), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
        ROW_MAJOR=True, TRANSPOSED=False, AMAX=amax is not None, AMAX_ATOMIC=True, SCALE_OUT=True, num_warps=_WARPS,
    )
    return y, scale_out


def _runs_on(device: torch.device) -> bool:
    return device.type == "cuda" and supports(device)


_GROUP_META: dict[tuple[Any, ...], tuple[torch.Tensor, int, int]] = {}


def _group_meta(xs: list[torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """``(meta, tiles, elements)`` of ``_cast_group_kernel`` for these tensors, uploaded once per set
    of (address, size): FSDP2's shards keep their storage, so a training run uploads it once
    (``torch.tensor(..., device="cuda")`` from pageable memory waits for the GPU)."""
    key = (xs[0].device, tuple((x.data_ptr(), x.numel()) for x in xs))
    if key not in _GROUP_META:
        if len(_GROUP_META) >= 32:  # storage that moved: drop stale tables rather than grow
            _GROUP_META.clear()
        numels = [x.numel() for x in xs]
        offsets, ends, total, tiles = [], [], 0, 0
        for k in numels:
            offsets.append(total)
            total += k
            tiles += -(-k // _GROUP_BLOCK)
            ends.append(tiles)
        host = [x.data_ptr() for x in xs] + numels + offsets + ends
        _GROUP_META[key] = (torch.tensor(host, dtype=torch.int64, device=xs[0].device), tiles, total)
    return _GROUP_META[key]


def cast_group(xs: list[torch.Tensor], scales: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """``[saturated_cast(x, scale, dtype) for x, scale in zip(xs, scales)]`` in one kernel launch
    (per 1024 tensors), outside compiled code: the fp8 weights of a whole model after an optimizer
    step (``fp8train.precompute_float8_dynamic_scale_for_fsdp``) without a launch per weight.

    Args:
        xs: contiguous bf16/fp16/fp32 CUDA tensors of one dtype on one device, any shapes, each under
            2**31 elements (empty ones allowed).
        scales: ``[len(xs)]`` fp32 tensor on that device: ``scales[i]`` multiplies ``xs[i]``.
        dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.

    Returns:
        fp8 tensors shaped like ``xs``, views of one buffer.

    Raises:
        ValueError: tensors, scales or dtype the kernel does not take, or a context where it cannot
            be launched directly (``launches_directly``).
    """
    if not xs:
        return []
    x0 = xs[0]
    if dtype not in _FP8 or x0.dtype not in (torch.bfloat16, torch.float16, torch.float32) or not _runs_on(x0.device):
        raise ValueError(
            f"cast_group: {x0.dtype} on {x0.device} -> {dtype}: needs bf16/fp16/fp32 tensors on an NVIDIA GPU of "
            f"compute capability 8.9+ with Triton installed, cast to one of {list(_FP8)}"
        )
    bad = [i for i, x in enumerate(xs) if x.dtype != x0.dtype or x.device != x0.device or not x.is_contiguous()
           or x.numel() >= 2**31]
    if bad:
        x = xs[bad[0]]
        raise ValueError(
            f"cast_group: every tensor must be contiguous, under 2**31 elements, {x0.dtype} on {x0.device} like "
            f"xs[0]; xs[{bad[0]}] is {tuple(x.shape)} {x.dtype} on {x.device}, contiguous={x.is_contiguous()} "
            f"({len(bad)} such)"
        )
    if scales.dtype != torch.float32 or tuple(scales.shape) != (len(xs),) or scales.device != x0.device:
        raise ValueError(f"cast_group: scales must be a [{len(xs)}] fp32 tensor on {x0.device}, got "
                         f"{tuple(scales.shape)} {scales.dtype} on {scales.device}")
    if not launches_directly(scales, *xs):
        raise ValueError("cast_group: needs plain tensors in eager code (no tracing, no tensor subclasses)")
    scales = scales.contiguous()
    total = sum(x.numel() for x in xs)
    flat = torch.empty(total, dtype=dtype, device=x0.device)
    out, start = [], 0
    for lo in range(0, len(xs), _GROUP_MAX):
        part = xs[lo:lo + _GROUP_MAX]
        meta, tiles, elements = _group_meta(part)
        if tiles:
            _cast_group_kernel[(tiles,)](
                meta, scales[lo:], part[0], flat[start:], len(part),
                FP8_MAX=float(torch.finfo(dtype).max), N_POW2=max(16, triton.next_power_of_2(len(part))),
                BLOCK=_GROUP_BLOCK, num_warps=_GROUP_WARPS,
            )
        for x in part:
            out.append(flat[start:start + x.numel()].view(x.shape))
            start += x.numel()
    return out

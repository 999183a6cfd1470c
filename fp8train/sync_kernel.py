"""The delayed-scaling sync of every layer in one Triton launch (CUDA).

``fp8train.delayed.sync_float8_amax_and_scale_history`` updates, per layer and operand role (a
*row*), four state buffers that live in separate 0-dim / 1-D tensors of separate modules::

    amax       0-dim fp32    running max since the last sync          -> reset to 0
    history    [H] fp32      past amaxes, newest first                -> rolled by one when updated
    scale      0-dim fp32    multiplier the casts use                 -> fp8_max / effective / 2**margin
    nonfinite  0-dim int64   syncs skipped for a NaN/inf amax         -> + 1 when skipped

In torch ops that takes ~25 launches on stacked copies (``torch.stack`` / ``unbind`` /
``_foreach_copy_`` of every buffer: most of its host time is per-buffer work, ~7 ms per step for a
113-layer model on a 2-core CPU). Here one program per row reads its buffers through a table of
their addresses and writes the new state in place: one launch whatever the layer count (two around
the all-reduce of amax when distributed: ``gather_amax`` stacks the amaxes for it, ``apply`` then
reads the reduced values). The addresses are uploaded once per set of buffers (``fp8train.delayed``
keeps the table while the buffers keep their storage).

The arithmetic is that of the torch path on CUDA, bit for bit (tested on GPU): fp32, an IEEE-rounded
division (``tl.div_rn``), the division by ``2**margin`` as torch's CUDA kernel does it (a multiply by
its fp32 reciprocal; exact for whole margins), the power-of-two rounding by clearing mantissa bits,
NaN in a loaded history giving a NaN scale as ``torch.amax`` does.
"""

from __future__ import annotations

import contextlib
import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the sync takes the torch path
    triton = None

__all__ = ["gather_amax", "apply"]

if triton is not None:

    @triton.jit
    def _sync_kernel(
        meta_ptr, reduced_ptr, n_rows, history_len, margin_mult, eps,
        MAX_INPUT: tl.constexpr, MAX_WEIGHT: tl.constexpr, MAX_GRAD: tl.constexpr, H_POW2: tl.constexpr,
        ALGO_MAX: tl.constexpr, POW2: tl.constexpr, MODE: tl.constexpr,  # 0 gather, 1 apply, 2 apply reduced
    ):
        # meta (int64): n_rows addresses each of amax, history, scale, nonfinite; row = layer * 3 + role
        row = tl.program_id(0)
        amax_p = tl.load(meta_ptr + row).to(tl.pointer_type(tl.float32))
        if MODE == 0:
            a = tl.load(amax_p)
            tl.store(reduced_ptr + row, tl.where(a == a, a, float("inf")))  # NaN -> inf: MAX is backend-safe
        else:
            hist_p = tl.load(meta_ptr + n_rows + row).to(tl.pointer_type(tl.float32))
            scale_p = tl.load(meta_ptr + 2 * n_rows + row).to(tl.pointer_type(tl.float32))
            count_p = tl.load(meta_ptr + 3 * n_rows + row).to(tl.pointer_type(tl.int64))
            if MODE == 2:
                a = tl.load(reduced_ptr + row)
            else:
                a = tl.load(amax_p)
            finite = (a == a) & (tl.abs(a) != float("inf"))
            # amax == 0: the operand was not seen since the last sync; keep the old history
            update = finite & (a > 0)
            i = tl.arange(0, H_POW2)
            valid = i < history_len
            h = tl.load(hist_p + i, mask=valid, other=0.0)
            prev = tl.load(hist_p + i - 1, mask=valid & (i > 0), other=0.0)
            new_h = tl.where(update, tl.where(i == 0, a, prev), h)
            if ALGO_MAX:
                effective = tl.max(tl.where(valid, new_h, 0.0), axis=0)
                # a NaN in a loaded history: torch's amax returns NaN, Triton's max skips it
                nans = tl.sum(tl.where(valid & (new_h != new_h), 1, 0), axis=0)
                effective = tl.where(nans > 0, float("nan"), effective)
            else:  # most recent
                effective = tl.sum(tl.where(i == 0, new_h, 0.0), axis=0)
            role = row % 3
            fp8_max = tl.where(role == 0, MAX_INPUT, tl.where(role == 1, MAX_WEIGHT, MAX_GRAD))
            floor = tl.maximum(effective, eps, propagate_nan=tl.PropagateNan.ALL)  # as torch.clamp(min=eps)
            scale = tl.div_rn(fp8_max, floor) * margin_mult
            if POW2:
                scale = (scale.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
            scale = tl.where(update, scale, tl.load(scale_p))
            count = tl.load(count_p) + tl.where(finite, 0, 1).to(tl.int64)
            tl.debug_barrier()  # every thread has read the old history before any writes the new one
            tl.store(hist_p + i, new_h, mask=valid)
            tl.store(scale_p, scale)
            tl.store(count_p, count)
            tl.store(amax_p, 0.0)


#: longest amax history the kernel takes (one program holds a row's history in registers)
MAX_HISTORY = 4096


@functools.lru_cache(maxsize=None)
def _reciprocal_pow2(margin: float) -> float:
    # torch on CUDA divides a tensor by a Python scalar as a multiply by the scalar's fp32 reciprocal
    # (``div_true_kernel_cuda``); the same here, so the two paths agree for any margin
    return (torch.tensor(1.0) / torch.tensor(2.0**margin, dtype=torch.float32)).item()


def _launch(meta: torch.Tensor, reduced: torch.Tensor, n_rows: int, history_len: int, margin: float, eps: float,
            fp8_maxes: tuple[float, float, float], algo_max: bool, pow2: bool, mode: int) -> None:
    if history_len > MAX_HISTORY:
        raise ValueError(f"sync_kernel: history_len={history_len} is over MAX_HISTORY={MAX_HISTORY}")
    with torch.cuda.device(meta.device) if meta.is_cuda else contextlib.nullcontext():  # Triton launches on the current device
        _sync_kernel[(n_rows,)](
            meta, reduced, n_rows, history_len, _reciprocal_pow2(margin), eps,
            MAX_INPUT=fp8_maxes[0], MAX_WEIGHT=fp8_maxes[1], MAX_GRAD=fp8_maxes[2],
            H_POW2=max(16, triton.next_power_of_2(history_len)), ALGO_MAX=algo_max, POW2=pow2, MODE=mode,
            num_warps=1 if history_len <= 1024 else 4,
        )


def gather_amax(meta: torch.Tensor, out: torch.Tensor) -> None:
    """``out[row] = amax of row`` (NaN as inf, so a MAX all-reduce treats it alike on every backend).

    Args:
        meta: ``[4 * rows]`` int64 addresses (amax, history, scale, nonfinite buffers; see the module).
        out: ``[rows]`` fp32 on the buffers' device.
    """
    n = out.numel()
    if n:
        _launch(meta, out, n, 1, 0.0, 1.0, (1.0, 1.0, 1.0), True, False, 0)


def apply(
    meta: torch.Tensor, n_rows: int, *, history_len: int, algo_max: bool, margin: float, pow2: bool, eps: float,
    fp8_maxes: tuple[float, float, float], reduced: torch.Tensor | None = None,
) -> None:
    """Fold each row's amax into its history, scale and non-finite count, then zero the amax; in place.

    Args:
        meta: ``[4 * n_rows]`` int64 buffer addresses (see the module); row ``3 * layer + role``.
        n_rows: rows (3 per layer).
        history_len: elements of each history buffer (at most ``MAX_HISTORY``).
        algo_max: scale from the max over the history (``False``: its newest entry).
        margin: scale divided by ``2**margin``.
        pow2: round scales down to a power of two.
        eps: floor of the amax a scale is computed from.
        fp8_maxes: largest finite value of the input, weight and grad_output fp8 dtypes.
        reduced: ``[n_rows]`` fp32 amaxes to use instead of the buffers' (after an all-reduce).
    """
    if n_rows:
        _launch(meta, meta if reduced is None else reduced, n_rows, history_len, margin, eps, fp8_maxes, algo_max,
                pow2, 1 if reduced is None else 2)

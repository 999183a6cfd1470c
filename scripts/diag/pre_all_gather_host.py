"""Host time of one fp8 pre-all-gather (FSDP2's cast of an fp32 weight shard before the
all-gather), per scaling kind, on one GPU: the CPU's microseconds per call (the GPU finishes each
small cast long before the next is issued), i.e. what FSDP2's all-gather path pays per gathered
weight on the thread that issues the step. Built to test whether delayed scaling's shard
cast (five launches before PERF_NOTES entry 22, one after) explains ``delayed+ag`` trailing
``delayed`` on 2 x H200.

    python scripts/diag/pre_all_gather_host.py [--rows 1024] [--cols 2048] [--calls 2000]

Cases: ``tensorwise`` (precomputed scale: the cast kernel alone, launched directly), ``delayed``
(stored scale, amax recorded: ``cast_kernel.cast_with_stored_scale``), ``delayed_5_launches``
(the same work as the former code did it: scale copy, cast with tile amaxes, tile reduction,
maximum, copy back) and ``delayed_torch`` (``cast_kernel="torch"``); ``tensorwise_cast_alone`` and
``tensorwise_stored_kernel`` time tensorwise's cast without the rest of the pre-all-gather, through
``cast_transpose`` and through ``cast_with_stored_scale`` (which passes no zero-size placeholder
tensors: tensorwise's pre-all-gather took 113 us against delayed's 56, entry 22);
``tensorwise_precast`` is the pre-all-gather after ``precompute_float8_dynamic_scale_for_fsdp``
cast every shard in one launch (entry 23: no cast left on the all-gather path); an ``_op`` suffix launches
the cast kernel through its ``torch.library`` op, as eager code did before entry 22. Prints a
table: us per call (host, and wall with the final sync), and whether each case's bytes equal
``delayed``'s.
"""

from __future__ import annotations

import argparse
import time

import torch

import fp8train
from fp8train import cast_kernel
from fp8train.fsdp import _precast, _stamp


class _OneRank:
    """FSDP2's shard mesh for one rank: the stored or precomputed scale needs no collective."""

    def size(self) -> int:
        return 1

    def get_group(self):
        raise RuntimeError("a collective was attempted")


def _layer(recipe: str, rows: int, cols: int, kernel: str) -> fp8train.Float8Linear:
    cfg = fp8train.Float8LinearConfig.from_recipe_name(recipe, enable_fsdp_float8_all_gather=True, cast_kernel=kernel)
    torch.manual_seed(0)  # the same weight in every case: the bytes compare
    lin = fp8train.Float8Linear(cols, rows, bias=False, config=cfg).cuda()
    w = lin.weight
    if recipe == "delayed":
        lin.is_amax_initialized = True
        lin.fp8_scale_weight.fill_(32.0)
    else:
        w._precomputed_scale, w._precomputed_at = torch.tensor(32.0, device="cuda"), _stamp(w, lin)
    return lin


def _five_launches(lin: fp8train.Float8Linear):
    """The former delayed shard cast, launch for launch."""
    scale = lin.fp8_scale_weight.clone()
    data, _, seen = cast_kernel.cast_transpose(lin.weight._tensor, scale, torch.float8_e4m3fn, transposed=False,
                                               amax=True)
    lin.fp8_amax_weight.copy_(torch.maximum(lin.fp8_amax_weight, seen))
    return data


def _cast_alone(lin: fp8train.Float8Linear):
    """tensorwise's cast as ``cast_transpose`` launches it (row-major only), outside the pre-all-gather."""
    return cast_kernel.cast_transpose(lin.weight._tensor, lin.weight._precomputed_scale, torch.float8_e4m3fn,
                                      transposed=False)[0]


def _stored_kernel(lin: fp8train.Float8Linear):
    """The same bytes through ``cast_with_stored_scale`` (no zero-size placeholder tensors, no amax)."""
    return cast_kernel.cast_with_stored_scale(lin.weight._tensor, lin.weight._precomputed_scale,
                                              torch.float8_e4m3fn)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1024, help="shard rows (llama_1b's 2048x2048 weight over 2 ranks)")
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    mesh = _OneRank()
    eager = cast_kernel._cast_transpose_eager
    cases = {
        "tensorwise": ("tensorwise", "auto", None),
        "tensorwise_op": ("tensorwise", "auto", None),
        "tensorwise_cast_alone": ("tensorwise", "auto", _cast_alone),
        "tensorwise_stored_kernel": ("tensorwise", "auto", _stored_kernel),
        "delayed": ("delayed", "auto", None),
        "delayed_5_launches": ("delayed", "auto", _five_launches),
        "delayed_5_launches_op": ("delayed", "auto", _five_launches),
        "delayed_torch": ("delayed", "torch", None),
        "tensorwise_precast": ("tensorwise", "auto", None),  # after the fused precompute's precast
        "tensorwise_again": ("tensorwise", "auto", None),  # the first case once more: an order effect?
    }
    bytes_of = {}
    rows = []
    for name, (recipe, kernel, fn) in cases.items():
        # _op: the kernel launched through its torch.library op, as before PERF_NOTES entry 22 in eager code
        cast_kernel._cast_transpose_eager = cast_kernel._cast_transpose_op if name.endswith("_op") else eager
        lin = _layer(recipe, args.rows, args.cols, kernel)
        w = lin.weight
        if name.endswith("_precast"):
            _precast([lin], [w], w._precomputed_scale.reshape(1))

        def call():
            if fn is not None:
                return fn(lin)
            (data,), _ = w.fsdp_pre_all_gather(mesh, w.shape, w.stride(), lin, None)
            return data

        for _ in range(20):
            call()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            out = call()
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        bytes_of[name] = out.view(torch.uint8).clone()
        rows.append((name, 1e6 * host / args.calls, 1e6 * total / args.calls))
    print(f"shard [{args.rows} x {args.cols}] fp32, {args.calls} calls, {torch.cuda.get_device_name()}")
    print(f"{'case':>24} {'host us/call':>13} {'wall us/call':>13} {'bytes == delayed':>17}")
    for name, host, total in rows:
        same = torch.equal(bytes_of[name], bytes_of["delayed"])
        print(f"{name:>24} {host:13.1f} {total:13.1f} {str(same):>17}")


if __name__ == "__main__":
    main()

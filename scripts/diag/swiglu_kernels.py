"""Correctness and speed of fp8train.swiglu_kernel's tile variants on a CUDA GPU, against inductor's
compiled SwiGLU (+ backward) fused with the same fp8 casts.

    python scripts/diag/swiglu_kernels.py [--rows 16384] [--cols 8192]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from fp8train import swiglu_kernel as K
from fp8train.scaling import amax_to_scale, saturated_cast

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2


def bench(fn, iters=20):
    for _ in range(3):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters * 1000  # us


def check(rows, cols):
    torch.manual_seed(0)
    h1, h3, dg = ((torch.randn(rows, cols, device="cuda") * 3).bfloat16() for _ in range(3))
    g = K.swiglu_reference(h1, h3)
    sg = amax_to_scale(g.abs().amax(), E4)
    d1, d3 = K.swiglu_backward_reference(dg, h1, h3)
    s1, s3 = (amax_to_scale(d.abs().amax(), E5) for d in (d1, d3))
    g8, _ = K.swiglu_cast(h1, h3, sg, E4)
    a, at, b, bt, gt, _, _ = K.swiglu_backward_cast(dg, h1, h3, scale_g=sg, scale_dh1=s1, scale_dh3=s3, g_dtype=E4,
                                                    grad_dtype=E5, amax=True)
    u = lambda t: t.view(torch.uint8)
    ok_layout = all(torch.equal(u(x), u(y.t().contiguous())) for x, y in ((at, a), (bt, b), (gt, g8)))
    frac = min((u(a) == u(saturated_cast(d1, s1, E5))).float().mean().item(),
               (u(b) == u(saturated_cast(d3, s3, E5))).float().mean().item(),
               (u(g8) == u(saturated_cast(g, sg, E4))).float().mean().item())
    return ok_layout, frac


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--cols", type=int, default=8192)
    args = p.parse_args()
    rows, cols = args.rows, args.cols
    h1, h3, dg = ((torch.randn(rows, cols, device="cuda") * 3).bfloat16() for _ in range(3))
    one = torch.tensor(1.0, device="cuda")
    mb = rows * cols / 1e6
    print(f"[{rows} x {cols}] bf16; roofline bytes: fwd {mb * 5:.0f} MB, bwd {mb * 11:.0f} MB")
    variants = [(64, 128, 8), (64, 64, 4), (128, 64, 8), (32, 128, 4), (64, 64, 8)]
    for bm, bn, w in variants:
        K._BLOCK_M, K._BLOCK_N, K._WARPS = bm, bn, w
        ok = [check(*s) for s in ((4096, 1024), (1000, 300), (2048, 4096))]
        fwd = bench(lambda: K.swiglu_cast(h1, h3, one, E4))
        bwd = bench(lambda: K.swiglu_backward_cast(dg, h1, h3, scale_g=one, scale_dh1=one, scale_dh3=one, g_dtype=E4,
                                                   grad_dtype=E5, amax=True))
        print(f"tile {bm}x{bn} warps {w}: layouts ok {[o[0] for o in ok]}, min bytes equal "
              f"{min(o[1] for o in ok):.5f}; fwd {fwd:.0f} us ({mb * 5 / fwd:.2f} TB/s), "
              f"bwd (delayed: cast + amax) {bwd:.0f} us ({mb * 11 / bwd:.2f} TB/s)", flush=True)

    # inductor, the same math and outputs (delayed: stored scales, amax recorded)
    def fwd_ref(h1, h3, s):
        g = K.swiglu_reference(h1, h3)
        return saturated_cast(g, s, E4), g.abs().amax()

    def bwd_ref(dg, h1, h3, sg, s1, s3):
        d1, d3 = K.swiglu_backward_reference(dg, h1, h3)
        g = K.swiglu_reference(h1, h3)
        a, b = saturated_cast(d1, s1, E5), saturated_cast(d3, s3, E5)
        return (a, a.t().contiguous(), b, b.t().contiguous(), saturated_cast(g.t(), sg, E4).contiguous(),
                d1.abs().amax(), d3.abs().amax())

    cf, cb = torch.compile(fwd_ref), torch.compile(bwd_ref)
    print(f"inductor: fwd {bench(lambda: cf(h1, h3, one)):.0f} us, "
          f"bwd {bench(lambda: cb(dg, h1, h3, one, one, one)):.0f} us", flush=True)


if __name__ == "__main__":
    main()

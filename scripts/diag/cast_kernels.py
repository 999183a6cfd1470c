"""Which formulation of amax / cast / cast+transpose does inductor turn into the fastest kernels? (diagnostic)

Times compiled standalone functions back to back (no sync between iterations) and prints GB/s
against the bytes each must move at minimum. Also bisects the rowwise grad_weight compile gap.
``--triton``: fp8train.cast_kernel (tile sizes swept) against inductor's casts instead.
"""
from __future__ import annotations

import statistics

import torch

from fp8train.scaling import amax_to_scale, saturated_cast

E4 = torch.float8_e4m3fn


def bench(fn, *args, iters=50):
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn(*args)
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / iters)
    return statistics.median(ts) * 1000  # us


def amax1(x):
    return x.abs().amax().float()


def amax2(x):
    return x.abs().amax(dim=-1).amax().float()


def amax3(x):
    return x.view(-1, 8192).abs().amax(dim=-1).amax().float()


def dyn_c1(x):  # amax, cast, transposed copy of the fp8 result
    s = amax_to_scale(amax1(x), E4)
    x8 = saturated_cast(x, s, E4)
    return x8, x8.t().contiguous(), s


def dyn_c2(x):  # transposed copy recomputed from x
    s = amax_to_scale(amax1(x), E4)
    return saturated_cast(x, s, E4), saturated_cast(x.t(), s, E4).contiguous(), s


def dyn_c3(x):
    s = amax_to_scale(amax2(x), E4)
    x8 = saturated_cast(x, s, E4)
    return x8, x8.t().contiguous(), s


def dyn_nt(x):  # no transpose
    s = amax_to_scale(amax1(x), E4)
    return saturated_cast(x, s, E4), s


def dyn_nt2(x):
    s = amax_to_scale(amax2(x), E4)
    return saturated_cast(x, s, E4), s


def del_c1(x, s, buf):  # delayed: stored scale, record amax
    buf.copy_(torch.maximum(buf, amax1(x)))
    x8 = saturated_cast(x, s, E4)
    return x8, x8.t().contiguous()


def del_c2(x, s, buf):
    buf.copy_(torch.maximum(buf, amax2(x)))
    x8 = saturated_cast(x, s, E4)
    return x8, x8.t().contiguous()


def del_nt1(x, s, buf):
    buf.copy_(torch.maximum(buf, amax1(x)))
    return saturated_cast(x, s, E4)


def del_nt2(x, s, buf):
    buf.copy_(torch.maximum(buf, amax2(x)))
    return saturated_cast(x, s, E4)


def del_nt3(x, s, buf):  # per-row amax out of the cast kernel, then a tiny reduction
    rows = x.abs().amax(dim=-1)
    x8 = saturated_cast(x, s, E4)
    buf.copy_(torch.maximum(buf, rows.amax().float()))
    return x8


def main():
    for m, k in ((16384, 4096), (16384, 8192)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        s = torch.tensor(10.0, device="cuda")
        buf = torch.zeros((), device="cuda")
        n = m * k
        print(f"\n== x [{m}x{k}] bf16 ({2 * n / 1e6:.0f} MB); GB/s = minimum bytes / time")
        print(f"  {'clone (copy)':28} {bench(torch.clone, x):8.1f} us  {4 * n / bench(torch.clone, x) / 1e3:6.0f} GB/s")
        for name, fn, nbytes, args in [
            ("amax1 abs().amax()", amax1, 2 * n, (x,)),
            ("amax2 amax(-1).amax()", amax2, 2 * n, (x,)),
            ("amax3 view(-1,8192)", amax3, 2 * n, (x,)),
            ("dyn no-transpose", dyn_nt, 5 * n, (x,)),
            ("dyn no-transpose amax2", dyn_nt2, 5 * n, (x,)),
            ("dyn c1 (x8, x8.t copy)", dyn_c1, 6 * n, (x,)),
            ("dyn c2 (x8, cast(x.t))", dyn_c2, 6 * n, (x,)),
            ("dyn c3 amax2 + x8.t", dyn_c3, 6 * n, (x,)),
            ("delayed nt amax1", del_nt1, 3 * n, (x, s, buf)),
            ("delayed nt amax2", del_nt2, 3 * n, (x, s, buf)),
            ("delayed nt rows", del_nt3, 3 * n, (x, s, buf)),
            ("delayed c1 amax1 + t", del_c1, 4 * n, (x, s, buf)),
            ("delayed c2 amax2 + t", del_c2, 4 * n, (x, s, buf)),
        ]:
            torch._dynamo.reset()
            c = torch.compile(fn)
            t = bench(c, *args)
            print(f"  {name:28} {t:8.1f} us  {nbytes / t / 1e3:6.0f} GB/s (min {nbytes / 1e6:.0f} MB)")

    # rowwise grad_weight compile gap bisect
    print("\n== rowwise pieces: compiled vs eager (max abs diff of dequantized, bits equal?)")
    torch.manual_seed(0)
    go = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16) * torch.rand(1, 512, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    from fp8train.config import ScaledMMConfig
    from fp8train.ops import Fp8Operand, scaled_mm_operands
    from fp8train.scaling import tensor_amax

    def castdim0(t):
        sc = amax_to_scale(tensor_amax(t, 0), E4, True)
        return Fp8Operand(saturated_cast(t, sc, E4), sc)

    def piece_cast_t(t):
        o = castdim0(t).t()
        return o.data.contiguous(), o.scale.contiguous()

    def piece_gw(g, xx):
        return scaled_mm_operands(castdim0(g).t(), castdim0(xx), ScaledMMConfig(), torch.bfloat16)

    def castdim1(t):
        sc = amax_to_scale(tensor_amax(t, -1), E4, True)
        return Fp8Operand(saturated_cast(t, sc, E4), sc)

    w = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)

    def piece_both(g, xx):  # layer-2 backward: grad_output cast along N (grad_input) and along M (grad_weight)
        gw = scaled_mm_operands(castdim0(g).t(), castdim0(xx), ScaledMMConfig(), torch.bfloat16)
        wt = castdim0(w)  # weight as the grad_input GEMM's right operand, reduced along N
        gi = scaled_mm_operands(castdim1(g), wt, ScaledMMConfig(), torch.bfloat16)
        return gw, gi

    ref_hp = go.float().t() @ x.float()
    e_gw, e_gi = piece_both(go, x)
    torch._dynamo.reset()
    c_gw, c_gi = torch.compile(piece_both)(go, x)
    print(f"  both casts of go    grad_weight equal={torch.equal(e_gw, c_gw)}  grad_input equal={torch.equal(e_gi, c_gi)}")
    for name, fn, args in [("cast dim0 + t", piece_cast_t, (go,)), ("grad_weight gemm", piece_gw, (go, x))]:
        e = fn(*args)
        torch._dynamo.reset()
        c = torch.compile(fn)(*args)
        if isinstance(e, tuple):
            same = all(torch.equal(a.view(torch.uint8) if a.dtype == E4 else a, b.view(torch.uint8) if b.dtype == E4 else b) for a, b in zip(e, c))
            print(f"  {name:20} bit-equal={same}")
        else:
            def sq(a, b):
                return (20 * torch.log10(b.norm() / (a.float() - b).norm())).item()
            print(f"  {name:20} eager/ref {sq(e, ref_hp):.1f} dB  compiled/ref {sq(c, ref_hp):.1f} dB  equal={torch.equal(e, c)}")
    for opt, val in (("triton.max_tiles", 1), ("pattern_matcher", False)):
        import torch._inductor.config as ic
        torch._dynamo.reset()
        with ic.patch({opt: val}):
            c = torch.compile(piece_gw)(go, x)
        print(f"  grad_weight gemm with inductor {opt}={val}: compiled/ref {(20 * torch.log10(ref_hp.norm() / (c.float() - ref_hp).norm())).item():.1f} dB")


def triton_main():
    """fp8train.cast_kernel vs inductor: delayed (stored scale: cast both layouts + amax in one read)
    and dynamic (an amax pass, then the cast) per operand shape; tile sizes swept for the kernel."""
    from fp8train import cast_kernel as ck

    def k_delayed(x, s, buf):
        y, yt, a = ck.cast_transpose(x, s, E4, amax=True)
        buf.copy_(torch.maximum(buf, a))
        return y, yt

    amax_c = torch.compile(amax2)

    def k_dynamic(x):
        sc = amax_to_scale(amax_c(x), E4)
        return ck.cast_transpose(x, sc, E4)

    def k_rows_amax(x, s, buf):  # forward-only layout + amax
        y, _, a = ck.cast_transpose(x, s, E4, transposed=False, amax=True)
        buf.copy_(torch.maximum(buf, a))
        return y

    default = (ck._BLOCK_M, ck._BLOCK_N, ck._WARPS)
    for m, k in ((16384, 4096), (16384, 8192), (4096, 4096), (16384, 2048)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        s = torch.tensor(10.0, device="cuda")
        buf = torch.zeros((), device="cuda")
        n = m * k
        print(f"\n== x [{m}x{k}] bf16 ({2 * n / 1e6:.0f} MB); GB/s = minimum bytes / time", flush=True)
        for name, fn, nbytes, args in [
            ("inductor dyn amax2 + x8.t", dyn_c3, 6 * n, (x,)),
            ("inductor delayed amax2 + t", del_c2, 4 * n, (x, s, buf)),
            ("inductor delayed nt amax2", del_nt2, 3 * n, (x, s, buf)),
        ]:
            torch._dynamo.reset()
            t = bench(torch.compile(fn), *args)
            print(f"  {name:34} {t:8.1f} us  {nbytes / t / 1e3:6.0f} GB/s", flush=True)
        for bm, bn, w in ((64, 128, 8), (64, 128, 4), (64, 64, 4), (128, 64, 8), (128, 128, 8), (32, 128, 4),
                          (64, 256, 8), (128, 256, 8)):
            ck._BLOCK_M, ck._BLOCK_N, ck._WARPS = bm, bn, w
            try:
                t = bench(k_delayed, x, s, buf)
            except Exception as e:  # noqa: BLE001
                print(f"  triton {bm}x{bn} w{w}: failed {type(e).__name__}: {e}")
                continue
            print(f"  triton delayed {bm}x{bn} w{w:<2}             {t:8.1f} us  {4 * n / t / 1e3:6.0f} GB/s", flush=True)
        ck._BLOCK_M, ck._BLOCK_N, ck._WARPS = default
        for name, fn, nbytes, args in [
            ("triton dynamic (amax2 + kernel)", k_dynamic, 6 * n, (x,)),
            ("triton rows + amax", k_rows_amax, 3 * n, (x, s, buf)),
        ]:
            t = bench(fn, *args)
            print(f"  {name:34} {t:8.1f} us  {nbytes / t / 1e3:6.0f} GB/s", flush=True)
        c = torch.compile(k_delayed)
        t = bench(c, x, s, buf)
        print(f"  {'triton delayed, compiled caller':34} {t:8.1f} us  {4 * n / t / 1e3:6.0f} GB/s", flush=True)


if __name__ == "__main__":
    import sys

    triton_main() if "--triton" in sys.argv else main()

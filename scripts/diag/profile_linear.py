"""Where does a compiled fp8 linear step spend its time? Kernel table per case + GEMM-only ratios (diagnostic).

    python scripts/diag/profile_linear.py [--shape 4096x4096] [--m 16384] [--cases bf16 tensorwise delayed]

Prints, per case, the CUDA kernels of 10 compiled fwd+bwd steps sorted by total time, then the
time of each GEMM alone (bf16 ``mm`` vs fp8 ``_scaled_mm`` with and without fast accumulation).
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import fp8train


def _time(fn, iters=20):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def kernel_table(m_tokens: int, k: int, n: int, case: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m_tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m_tokens, n, device="cuda", dtype=torch.bfloat16)
    mod = copy.deepcopy(base)
    after = lambda: None  # noqa: E731
    if case != "bf16":
        mod = fp8train.convert_to_float8_training(mod, config=case, auto_filter=False)
        if mod.config.has_delayed:
            after = lambda: fp8train.sync_float8_amax_and_scale_history(mod)  # noqa: E731
    torch._dynamo.reset()
    c = torch.compile(mod)

    def step():
        c(x).backward(g)
        mod.weight.grad = None
        x.grad = None
        after()

    ms = _time(step)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.count > 0:
            rows.append((t / 10, e.count // 10, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"\n== {case} {k}x{n} M={m_tokens}: step {ms:.3f} ms (events), kernels sum {total / 1000:.3f} ms/step")
    for t, cnt, name in rows[:25]:
        print(f"  {t:9.1f} us  x{cnt:<3} {name[:150]}")


def gemm_only(m_tokens: int, k: int, n: int) -> None:
    e4 = torch.float8_e4m3fn
    one = torch.ones((), device="cuda")
    print(f"\n== GEMM only, {k}x{n}, M={m_tokens}")
    for name, (mm, kk, nn_) in {"output": (m_tokens, k, n), "grad_input": (m_tokens, n, k), "grad_weight": (n, m_tokens, k)}.items():
        a = torch.randn(mm, kk, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(nn_, kk, device="cuda", dtype=torch.bfloat16).t()
        a8, b8 = a.to(e4), b.t().contiguous().to(e4).t()
        tb = _time(lambda: torch.mm(a, b))
        tf = _time(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16, use_fast_accum=True))
        ts = _time(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16, use_fast_accum=False))
        fl = 2 * mm * kk * nn_
        print(f"  {name:12} [{mm}x{kk}]@[{kk}x{nn_}] bf16 {tb:.3f} ms ({fl / tb / 1e9:.0f} TF)  fp8 fast {tf:.3f} ms "
              f"({tb / tf:.2f}x)  fp8 exact {ts:.3f} ms ({tb / ts:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", nargs="+", default=["4096x4096"])
    p.add_argument("--m", type=int, default=16384)
    p.add_argument("--cases", nargs="+", default=["bf16", "tensorwise", "delayed"])
    p.add_argument("--no-gemm", action="store_true")
    a = p.parse_args()
    for s in a.shape:
        k, n = (int(v) for v in s.split("x"))
        for case in a.cases:
            kernel_table(a.m, k, n, case)
        if not a.no_gemm:
            gemm_only(a.m, k, n)


if __name__ == "__main__":
    main()

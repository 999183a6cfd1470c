"""The optimizer step alone, on the 1.2B Llama's parameter shapes (no model): GPU time per step
(CUDA events), host time per step (``step()``'s wall time with an empty queue) and the top kernels.

    python scripts/diag/profile_optim.py --out profile_optim.json

Cases: ``adamw`` (fused), ``adamw_foreach``, ``adamw_fp8`` (Triton kernel), ``adamw_fp8_torch``
(``fused=False, compile=True``), ``adamw_fp8_v8`` (kernel, fp8 second moment). fp32 parameters
and gradients, as under ``bf16-mixed``. Ideal GPU time is bytes moved / HBM bandwidth: fused
AdamW ~28 B/param, AdamWFp8 ~18 (16 with fp8 v).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fp8train.models.llama import Llama, LlamaConfig
from fp8train.optim import AdamWFp8

CASES = ("adamw", "adamw_foreach", "adamw_fp8", "adamw_fp8_torch", "adamw_fp8_v8")


def make(case: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    if case == "adamw":
        return torch.optim.AdamW(params, fused=True, **kw)
    if case == "adamw_foreach":
        return torch.optim.AdamW(params, foreach=True, **kw)
    return AdamWFp8(params, second_moment="fp8" if case == "adamw_fp8_v8" else "bf16",
                    fused=False if case == "adamw_fp8_torch" else None, compile=True, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama_1b", choices=LlamaConfig.names())
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cprofile", action="store_true", help="print where step()'s host time goes (cProfile)")
    ap.add_argument("--out", default="profile_optim.json")
    args = ap.parse_args()
    with torch.device("meta"):
        shapes = [tuple(p.shape) for p in Llama(LlamaConfig.from_name(args.model)).parameters()]
    n = sum(torch.Size(s).numel() for s in shapes)
    results = {}
    for case in args.cases:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = make(case, params)
        t0 = time.perf_counter()
        for _ in range(3):
            opt.step()
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        gpu, host = [], []
        for _ in range(args.steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            h = time.perf_counter()
            a.record()
            opt.step()
            b.record()
            host.append((time.perf_counter() - h) * 1e3)
            torch.cuda.synchronize()
            gpu.append(a.elapsed_time(b))
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=8)
        if args.cprofile:
            import cProfile
            import pstats

            torch.cuda.synchronize()
            with cProfile.Profile() as cp:
                opt.step()
            pstats.Stats(cp).sort_stats("tottime").print_stats(12)
            torch.cuda.synchronize()
        gpu.sort()
        host.sort()
        results[case] = r = {"gpu_ms": gpu[len(gpu) // 2], "host_ms": host[len(host) // 2], "warmup_s": warm,
                             "gb_per_s_at_18B": n * 18 / gpu[len(gpu) // 2] / 1e6}
        print(f"{case}: GPU {r['gpu_ms']:.2f} ms/step, host {r['host_ms']:.2f} ms/step, warm-up {warm:.1f} s", flush=True)
        print(table, flush=True)
        del opt, params
        torch.cuda.empty_cache()
    print(f"\n{args.model}: {n / 1e9:.2f}B parameters, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for case, r in results.items():
        print(f"{case:>16} GPU {r['gpu_ms']:7.2f} ms  host {r['host_ms']:7.2f} ms")
    with open(args.out, "w") as f:
        json.dump({"params": n, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

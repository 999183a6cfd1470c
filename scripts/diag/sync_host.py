"""Cost of the delayed-scaling sync: one Triton launch (``fp8train.sync_kernel``) vs torch ops (diagnostic).

    python scripts/diag/sync_host.py [--layers 1 16 112] [--linear 4096x4096 8192x8192] [--train llama_125m]

1. Host and GPU microseconds per ``sync_float8_amax_and_scale_history`` call for models of N
   delayed ``Float8Linear`` layers, each path: host = wall time of 200 calls issued back to back
   (no device sync in between), GPU = CUDA events around the same 200 calls.
2. ``--linear``: ``scripts/bench_linear.py``'s compiled fwd+bwd of one layer, delayed recipes
   (inductor's casts and the Triton cast kernel), with the sync after every step on each path;
   bf16 and tensorwise alongside.
3. ``--train``: ``scripts/bench_train.py``'s end-to-end case ``delayed+all`` on each path, and bf16.
The torch path is forced by making the plan's groups ineligible for the kernel.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn

import fp8train
from fp8train import delayed

_KERNEL_CHECK = delayed._plain_cuda


def use_kernel(on: bool) -> None:
    delayed._plain_cuda = _KERNEL_CHECK if on else (lambda *args: False)
    delayed._PLANS.clear()


def sync_cost(n_layers: int, calls: int = 200) -> dict[str, float]:
    m = nn.Sequential(*[nn.Linear(64, 64, bias=False, device="cuda") for _ in range(n_layers)])
    m = fp8train.convert_to_float8_training(m, config="delayed", auto_filter=False)
    m(torch.randn(32, 64, device="cuda")).sum().backward()
    out = {}
    for path in ("torch", "kernel"):
        use_kernel(path == "kernel")
        for _ in range(10):
            fp8train.sync_float8_amax_and_scale_history(m)
        torch.cuda.synchronize()
        host, gpu = [], []
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            t0 = time.perf_counter()
            for _ in range(calls):
                fp8train.sync_float8_amax_and_scale_history(m)
            host.append((time.perf_counter() - t0) / calls * 1e6)
            b.record()
            torch.cuda.synchronize()
            gpu.append(a.elapsed_time(b) / calls * 1e3)
        out[f"{path}_host_us"] = statistics.median(host)
        out[f"{path}_gpu_us"] = statistics.median(gpu)
    use_kernel(True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="*", default=[1, 16, 112])
    p.add_argument("--linear", nargs="*", default=[], help="KxN shapes for the one-layer benchmark")
    p.add_argument("--m", type=int, default=16384)
    p.add_argument("--train", nargs="*", default=[], help="models for the end-to-end case")
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="sync_host.json")
    args = p.parse_args()
    results: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    for n in args.layers:
        r = sync_cost(n)
        results[f"sync_{n}"] = r
        print(f"sync, {n:4d} layers: torch {r['torch_host_us']:8.1f} us host {r['torch_gpu_us']:8.1f} us GPU | "
              f"kernel {r['kernel_host_us']:8.1f} us host {r['kernel_gpu_us']:8.1f} us GPU", flush=True)

    if args.linear:
        from scripts.bench_linear import bench_shape

        for shape in args.linear:
            k, n = (int(v) for v in shape.split("x"))
            use_kernel(False)
            before = bench_shape(args.m, k, n, ["bf16", "tensorwise", "delayed", "delayed/triton"], 30, 10)
            use_kernel(True)
            after = bench_shape(args.m, k, n, ["delayed", "delayed/triton"], 30, 10)
            results[f"linear_{shape}"] = {"torch_sync": before, "kernel_sync": after}
            bf = before["bf16"]
            print(f"linear {shape}: bf16 {bf:.3f} ms, tensorwise {bf / before['tensorwise']:.2f}x | delayed "
                  f"{bf / before['delayed']:.2f}x -> {bf / after['delayed']:.2f}x | delayed/triton "
                  f"{bf / before['delayed/triton']:.2f}x -> {bf / after['delayed/triton']:.2f}x", flush=True)

    if args.train:
        from fp8train.models.llama import LlamaConfig
        from scripts.bench_train import run_case

        for name in args.train:
            cfg = LlamaConfig.from_name(name, max_seq_len=2048)
            res = {"bf16": run_case("bf16", cfg, 8, 2048, args.warmup, args.steps)}
            for path in ("kernel", "torch"):
                use_kernel(path == "kernel")
                res[f"delayed+all, {path} sync"] = run_case("delayed+all", cfg, 8, 2048, args.warmup, args.steps,
                                                            eager_until_synced=True)
            use_kernel(True)
            results[f"train_{name}"] = res
            for case, r in res.items():
                print(f"train {name} {case}: {r['tokens_per_s']:,.0f} tokens/s "
                      f"({r['tokens_per_s'] / res['bf16']['tokens_per_s']:.3f}x), {r['peak_mem_gib']:.1f} GiB, "
                      f"warm-up {r['warmup_s']:.0f} s", flush=True)

    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

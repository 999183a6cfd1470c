"""Benchmark forward+backward of one linear layer: fp8 recipes vs bf16, compiled, on CUDA.

    python scripts/bench_linear.py [--m 16384] [--recipes tensorwise delayed ...] [--out bench_linear.json]

Each case times ``y = linear(x); y.backward(grad)`` (bf16 weights and activations) under
``torch.compile`` (``--eager``: without it): ``--iters`` steps queued back to back between CUDA events (as in training, where
the CPU runs ahead of the GPU), median of 5 such windows, after ``--warmup`` steps; ``--sync-each``
times every step alone instead (adds each step's CPU launch latency). Delayed recipes run their
amax/scale sync after every step, inside the timed region (one optimizer step per step). If torchao is importable, ``torchao.float8``'s
tensorwise and rowwise recipes run side by side (optional; never a dependency).
The speedup table (bf16 time / case time) is printed last and the raw numbers written as JSON.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import subprocess
from typing import Callable

import torch
import torch.nn as nn

import fp8train
from fp8train.config import CAST_KERNELS
from fp8train.costmodel import for_current_device

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (1024, 1024)]


def _time_ms(step: Callable[[], None], after: Callable[[], None], iters: int, warmup: int, sync_each: bool) -> float:
    """Median ms per training step (``step`` then ``after``, e.g. the delayed-scaling sync).

    Default: ``iters`` steps queued back to back between two CUDA events, as in training, where
    the CPU runs ahead of the GPU; median of 5 such windows. ``sync_each`` times every step alone
    after a device sync instead, which adds the CPU launch latency of each step to its time.
    """
    for _ in range(warmup):
        step()
        after()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters if sync_each else 5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(1 if sync_each else iters):
            step()
            after()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / (1 if sync_each else iters))
    return statistics.median(times)


def _make_case(name: str, base: nn.Linear) -> tuple[nn.Module, Callable[[], None]]:
    m = copy.deepcopy(base)
    after: Callable[[], None] = lambda: None  # noqa: E731
    if name == "bf16":
        return m, after
    if name.startswith("torchao_"):
        from torchao.float8 import Float8LinearConfig as AoConfig
        from torchao.float8 import convert_to_float8_training as ao_convert

        return ao_convert(m, config=AoConfig.from_recipe_name(name[len("torchao_"):])), after
    recipe, _, kernel = name.partition("/")  # "tensorwise/torch": the recipe with cast_kernel="torch"
    config = fp8train.Float8LinearConfig.from_recipe_name(recipe, **({"cast_kernel": kernel} if kernel else {}))
    m = fp8train.convert_to_float8_training(m, config=config, auto_filter=False)  # measure every shape
    if m.config.has_delayed:
        after = lambda: fp8train.sync_float8_amax_and_scale_history(m)  # noqa: E731
    return m, after


def bench_shape(m_tokens: int, k: int, n: int, cases: list[str], iters: int, warmup: int, sync_each: bool = False,
                eager: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    base = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m_tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(m_tokens, n, device="cuda", dtype=torch.bfloat16)
    out: dict[str, float] = {}
    for name in cases:
        torch._dynamo.reset()
        module, after = _make_case(name, base)
        compiled = module if eager else torch.compile(module)

        def step() -> None:
            compiled(x).backward(grad)
            module.weight.grad = None
            x.grad = None

        out[name] = _time_ms(step, after, iters, warmup, sync_each)
        del module, compiled
        torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=16384, help="tokens (batch x sequence)")
    p.add_argument("--recipes", nargs="+", default=fp8train.recipe_names(), metavar="RECIPE",
                   choices=fp8train.recipe_names() + [f"{r}/{k}" for r in fp8train.recipe_names() for k in CAST_KERNELS],
                   help="recipes; 'RECIPE/KERNEL' also sets Float8LinearConfig.cast_kernel (auto, triton, torch)")
    p.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN pairs")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--sync-each", action="store_true", help="time each step alone (adds launch latency)")
    p.add_argument("--no-torchao", action="store_true", help="skip torchao even if importable")
    p.add_argument("--eager", action="store_true", help="no torch.compile (eager mode, as without model.compile)")
    p.add_argument("--out", default="bench_linear.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_linear.py needs a CUDA GPU (fp8 tensor cores, sm_89+)")

    cases = ["bf16"] + list(args.recipes)
    if not args.no_torchao:
        try:
            import torchao.float8  # noqa: F401

            cases += ["torchao_tensorwise", "torchao_rowwise"]
        except ImportError:
            pass
    results = {}
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        results[shape] = bench_shape(args.m, k, n, cases, args.iters, args.warmup, args.sync_each, args.eager)
        print(f"{shape}: " + ", ".join(f"{c} {t:.3f} ms" for c, t in results[shape].items()), flush=True)

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "m_tokens": args.m,
        "iters": args.iters,
        "timing": "each step alone" if args.sync_each else "back to back",
        "compiled": not args.eager,
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "ms": results}, f, indent=2)

    print(f"\nfwd+bwd speedup vs bf16 ({'eager' if args.eager else 'compiled'}, M={args.m}, {meta['device']}, torch {meta['torch']}, {meta['date']})")
    model = for_current_device().replace(tokens=args.m)
    header = f"{'K x N':>12} {'bf16 ms':>9} " + " ".join(f"{c:>20}" for c in cases[1:]) + f" {'cost model':>11}"
    print(header)
    for shape, r in results.items():
        k, n = (int(v) for v in shape.split("x"))
        print(f"{shape:>12} {r['bf16']:9.3f} " + " ".join(f"{r['bf16'] / r[c]:19.2f}x" for c in cases[1:])
              + f" {model.predicted_speedup(k, n):10.2f}x")


if __name__ == "__main__":
    main()

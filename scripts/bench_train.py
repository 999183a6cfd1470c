"""End-to-end training throughput of the built-in Llama: fp8 recipes vs bf16, on one CUDA GPU.

    python scripts/bench_train.py [--model llama_1b] [--batch 8] [--seq 2048] [--recipes tensorwise delayed]

Each case builds the model from the same seed, converts it (every linear but ``lm_head`` that the
auto filter keeps, as a user gets by default; ``<recipe>+all`` converts them all; bf16 runs
unconverted; ``+unfused`` keeps SwiGLU feed-forwards as three separate layers instead of the
default ``Float8SwiGLU``; a ``/<cast_kernel>`` suffix such as ``tensorwise/torch`` sets
``Float8LinearConfig.cast_kernel``), compiles it (not with ``--eager``), and runs AdamW steps under
bf16 autocast on random tokens. After
``--warmup`` steps (compilation included) it times ``--steps`` steps with CUDA events (the median step) and reports
tokens/s, MFU (model FLOPs from ``fp8train.perf``; the peak is the bf16 dense peak for every case so
MFU compares like with like) and peak memory (over the whole case, and "steady": over the timed
steps only). Delayed recipes sync amax/scale once per step inside the timed region, as a real run
does; with ``--eager-until-synced`` their steps before the first sync run uncompiled
(``fp8train.eager_until_synced``: one compilation instead of two; the eager step's memory shows in
the whole-case peak only). The table is printed last and raw numbers written as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import pathlib
import statistics
import subprocess
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

import fp8train
from fp8train.config import CAST_KERNELS
from fp8train.costmodel import for_current_device
from fp8train.models.llama import Llama, LlamaConfig
from fp8train.perf import flops_per_token, mfu, peak_flops


def time_steps(step: Callable[[], torch.Tensor], warmup: int, steps: int,
               after_warmup: Callable[[], None] | None = None) -> tuple[float, float, float]:
    """Run ``warmup`` untimed then ``steps`` timed calls of ``step`` (``after_warmup()`` between
    them). Returns ``(seconds per step, warm-up seconds, last loss)``.

    Seconds per step is the **median** step: on a GPU, the time between CUDA events recorded at
    consecutive step boundaries without syncing (the CPU runs ahead as in training); on CPU, wall
    time per step. The median keeps a one-off stall (a late recompile, an allocator resize) out of
    the figure; when the slowest step exceeds the median by more than 30% that is printed, since it
    means the warm-up was too short (a 3-step warm-up once made an FSDP2 case read 28% slow).
    """
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    sync()
    warmup_s = time.perf_counter() - t0
    if after_warmup is not None:
        after_warmup()
    if cuda:
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        marks[0].record()
        for i in range(steps):
            loss = step()
            marks[i + 1].record()
        sync()
        times = [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]
    else:
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t)
    median = statistics.median(times)
    if max(times) > 1.3 * median:
        print(f"time_steps: slowest step {max(times) * 1000:.1f} ms vs median {median * 1000:.1f} ms "
              f"(steps: {', '.join(f'{t * 1000:.0f}' for t in times)}); consider a longer warm-up", flush=True)
    return median, warmup_s, float(loss)


def meta(**extra: Any) -> dict[str, Any]:
    """Device, torch version, date, git commit and a hash of the ``fp8train`` sources of a benchmark
    run, plus ``extra``. The source hash identifies the code that ran even where the checkout's git
    metadata is not that of the files (a copied working tree)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    root = pathlib.Path(fp8train.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "commit": commit, "fp8train_sha256": digest.hexdigest()[:12], **extra}


def run_case(name: str, cfg: LlamaConfig, batch: int, seq: int, warmup: int, steps: int,
             eager: bool = False, eager_until_synced: bool = False) -> dict[str, float]:
    """One case: ``bf16``, a recipe name (auto filter on, the default on CUDA), ``<recipe>+all``
    (every linear but ``lm_head`` converted, auto filter off), ``+unfused`` (no ``Float8SwiGLU``);
    a ``/<cast_kernel>`` suffix sets ``Float8LinearConfig.cast_kernel`` (``tensorwise/torch``)."""
    base, _, kernel = name.partition("/")
    recipe, *variants = base.split("+")
    cost_model = for_current_device()
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = Llama(cfg).cuda()
    n_fp8 = 0
    if recipe != "bf16":
        auto = False if "all" in variants else cost_model.replace(tokens=batch * seq)
        config = fp8train.Float8LinearConfig.from_recipe_name(recipe, **({"cast_kernel": kernel} if kernel else {}))
        fp8train.convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn != "lm_head",
                                            auto_filter=auto, fuse_swiglu=False if "unfused" in variants else None)
        n_fp8 = len(fp8train.conversion_report(model).converted)
    delayed = recipe != "bf16" and fp8train.Float8LinearConfig.from_recipe_name(recipe).has_delayed
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    compiled = model if eager else torch.compile(model)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda")
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> torch.Tensor:
        with fp8train.eager_until_synced(model) if delayed and eager_until_synced else contextlib.nullcontext():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = compiled(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            loss.backward()
        if delayed:
            fp8train.sync_float8_amax_and_scale_history(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    peak_case = 0
    def steady() -> None:
        nonlocal peak_case
        peak_case = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    sec_per_step, warmup_s, final_loss = time_steps(step, warmup, steps, after_warmup=steady)
    tps = batch * seq / sec_per_step
    peak = peak_flops(torch.device("cuda"), fp8=False)
    result = {
        "tokens_per_s": tps,
        "ms_per_step": sec_per_step * 1000,
        "mfu_bf16_peak": mfu(tps, flops_per_token(cfg, seq), peak) if peak else float("nan"),
        "peak_mem_gib": max(peak_case, torch.cuda.max_memory_allocated()) / 2**30,
        "peak_mem_steady_gib": torch.cuda.max_memory_allocated() / 2**30,
        "fused_swiglu": len(fp8train.conversion_report(model).fused_swiglu) if n_fp8 else 0,
        "final_loss": final_loss,
        "warmup_s": warmup_s,
        "fp8_layers": n_fp8,
    }
    del model, compiled, opt
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_1b", choices=LlamaConfig.names())
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    cases = fp8train.recipe_names() + [f"{r}+all" for r in fp8train.recipe_names()]
    cases += [f"{c}+unfused" for c in cases]
    cases += [f"{c}/{k}" for c in cases for k in CAST_KERNELS]
    p.add_argument("--recipes", nargs="+", default=["tensorwise", "delayed", "rowwise"], choices=cases, metavar="CASE",
                   help="recipe (auto filter on, as by default on CUDA) or recipe+all (every linear but lm_head); "
                        "a /KERNEL suffix sets Float8LinearConfig.cast_kernel (auto, triton, torch); +unfused "
                        "keeps SwiGLU feed-forwards as three layers (no Float8SwiGLU)")
    p.add_argument("--fuse-projections", action="store_true", help="LlamaConfig.fuse_projections: wqkv and w13 GEMMs")
    p.add_argument("--eager", action="store_true", help="no torch.compile (eager mode)")
    p.add_argument("--eager-until-synced", action="store_true",
                   help="delayed recipes: steps before the first sync run uncompiled (compile once)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="bench_train.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train.py needs a CUDA GPU")
    cfg = LlamaConfig.from_name(args.model, max_seq_len=max(args.seq, 1), fuse_projections=args.fuse_projections)
    results = {}
    for name in ["bf16"] + args.recipes:
        results[name] = run_case(name, cfg, args.batch, args.seq, args.warmup, args.steps, args.eager,
                                 args.eager_until_synced)
        r = results[name]
        print(f"{name}: {r['tokens_per_s']:.0f} tok/s, {r['ms_per_step']:.1f} ms/step, MFU {r['mfu_bf16_peak']:.3f}, "
              f"peak {r['peak_mem_gib']:.1f} GiB (steady {r['peak_mem_steady_gib']:.1f}), loss {r['final_loss']:.3f}, warmup {r['warmup_s']:.0f}s", flush=True)
    info = meta(model=args.model, batch=args.batch, seq=args.seq, fuse_projections=args.fuse_projections,
                compiled=not args.eager, eager_until_synced=args.eager_until_synced)
    with open(args.out, "w") as f:
        json.dump({"meta": info, "results": results}, f, indent=2)
    base = results["bf16"]
    print(f"\n{args.model} batch {args.batch} x seq {args.seq}, AdamW, {'eager' if args.eager else 'compiled'} ({info['device']}, torch {info['torch']}, {info['date']})")
    print(f"{'case':>24} {'tok/s':>10} {'speedup':>8} {'MFU':>6} {'peak GiB':>9} {'steady':>7} {'fp8 layers':>10} "
          f"{'fused FFN':>9} {'warm-up s':>9}")
    for name, r in results.items():
        print(f"{name:>24} {r['tokens_per_s']:10.0f} {r['tokens_per_s'] / base['tokens_per_s']:7.3f}x "
              f"{r['mfu_bf16_peak']:6.3f} {r['peak_mem_gib']:9.1f} {r['peak_mem_steady_gib']:7.1f} "
              f"{r['fp8_layers']:10d} {r['fused_swiglu']:9d} {r['warmup_s']:9.0f}")


if __name__ == "__main__":
    main()

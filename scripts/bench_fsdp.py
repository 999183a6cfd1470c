"""FSDP2 training throughput of the built-in Llama per GPU: bf16 vs fp8, with and without fp8 all-gather.

    torchrun --nproc_per_node=2 scripts/bench_fsdp.py                      # 2 GPUs, all cases
    python scripts/bench_fsdp.py --cases bf16 tensorwise tensorwise+ag     # world size 1 (one GPU)
    torchrun --nproc_per_node=2 scripts/bench_fsdp.py --tp 2 --cases bf16 tensorwise   # tensor parallel
    torchrun --nproc_per_node=2 scripts/bench_fsdp.py --cpu --model llama_tiny --seq 64 --batch 2 \\
        --warmup 1 --steps 2 --no-compile                                  # CPU smoke test (gloo)

Cases: ``bf16`` (no conversion), a recipe name (``tensorwise``, ``delayed``, ...), or a recipe with
``+ag`` (``Float8LinearConfig.enable_fsdp_float8_all_gather=True``: weights all-gathered in fp8)
and/or ``+unfused`` (SwiGLU feed-forwards as three layers, not ``fp8train.Float8SwiGLU``).
Default: bf16, tensorwise, tensorwise+ag, delayed, delayed+ag.

Each case builds the model on the meta device from the same seed, converts the linears but
``lm_head`` (with ``bench_train.py``'s auto filter: layers the GPU cost model says fp8 does not pay
for stay bf16; ``--no-auto-filter`` converts all of them), compiles each block, shards each block and the root with ``fully_shard`` (the Hydra
app's ``fp8train.train.parallel.apply_fsdp2``: bf16 parameters all-gathered, fp32 gradient
reduction; last block not resharded after forward), allocates this rank's shards
(``materialize``), then runs fused-AdamW steps under bf16 autocast on random tokens (each rank its
own). Delayed recipes sync amax once per step and ``+ag`` dynamic recipes run the fused scale
precompute once per step, inside the timed region, as a real run does. After ``--warmup`` steps
(compilation included) ``--steps`` steps are timed with CUDA events (the median step); the slowest rank's step time
counts. Reported per GPU: tokens/s (this rank's batch x seq / step time), MFU against the bf16 dense
peak for every case, peak memory (max over ranks). Rank 0 prints the table last and writes the raw
numbers as JSON (``--out``). Timings of different devices or world sizes do not compare.

``--tp N``: a 2-D mesh (``data_parallel`` = world / N, ``tensor_parallel`` = N); each block is
split over the N ranks first (``fp8train.train.parallel.apply_tensor_parallel``: fp8 GEMMs on
the local shards for converted layers), then compiled and sharded over ``data_parallel``. The N
ranks of a group train on the same tokens: ``--batch`` is then sequences per group, and tokens/s
per GPU is that group's tokens / N. ``+ag`` cases are refused with TP (not supported there).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import meta, time_steps  # noqa: E402

import fp8train  # noqa: E402
from fp8train.costmodel import for_current_device  # noqa: E402
from fp8train.models.llama import Llama, LlamaConfig  # noqa: E402
from fp8train.perf import flops_per_token, mfu, peak_flops  # noqa: E402
from fp8train.train.parallel import apply_fsdp2, apply_tensor_parallel, materialize  # noqa: E402

DEFAULT_CASES = ["bf16", "tensorwise", "tensorwise+ag", "delayed", "delayed+ag"]


def case_config(name: str, cpu: bool) -> fp8train.Float8LinearConfig | None:
    """``None`` for bf16; else the recipe, with fp8 all-gather for ``+ag`` (and emulated GEMMs on CPU).

    Raises:
        ValueError: unknown recipe, or ``+ag`` with a recipe whose weight cast cannot be gathered
            in fp8 (the config's message says why).
    """
    if name == "bf16":
        return None
    recipe, *suffixes = name.split("+")
    if not set(suffixes) <= {"ag", "unfused"}:
        raise ValueError(f"case {name!r}: suffixes are '+ag' (fp8 all-gather) and '+unfused' (no Float8SwiGLU); valid: "
                         f"bf16, <recipe>, <recipe>+ag, <recipe>+unfused, <recipe>+ag+unfused with recipes "
                         f"{fp8train.recipe_names()}")
    overrides = {"enable_fsdp_float8_all_gather": "ag" in suffixes}
    if cpu:
        overrides["emulate"] = True
    return fp8train.Float8LinearConfig.from_recipe_name(recipe, **overrides)


def run_case(name: str, cfg: LlamaConfig, args: argparse.Namespace, mesh, device: torch.device) -> dict[str, float]:
    cuda = device.type == "cuda"
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    config = case_config(name, not cuda)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama(cfg)
    n_fp8 = 0
    if config is not None:
        auto = (for_current_device().replace(tokens=args.batch * args.seq, tensor_parallel=args.tp)
                if args.auto_filter and cuda else False)
        fp8train.convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn != "lm_head",
                                            auto_filter=auto, fuse_swiglu=False if "+unfused" in name else None)
        n_fp8 = len(fp8train.conversion_report(model).converted)
    if args.tp > 1:
        apply_tensor_parallel(model, mesh["tensor_parallel"])
    if args.compile:
        for block in model.layers:
            block.compile()
    apply_fsdp2(model, mesh, "bf16-mixed")
    materialize(model, device)
    delayed = config is not None and config.has_delayed
    precompute = config is not None and config.enable_fsdp_float8_all_gather and not delayed
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    dp_rank = mesh["data_parallel"].get_local_rank()  # the ranks of a TP group share their tokens
    g = torch.Generator(device=device).manual_seed(1 + dp_rank)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device, generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    if precompute:
        fp8train.precompute_float8_dynamic_scale_for_fsdp(model)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        if delayed:
            fp8train.sync_float8_amax_and_scale_history(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if precompute:
            fp8train.precompute_float8_dynamic_scale_for_fsdp(model)
        return loss.detach()

    sec_per_step, warmup_s, final_loss = time_steps(step, args.warmup, args.steps)
    # the slowest rank sets the pace; memory: the largest rank's
    worst = torch.tensor([sec_per_step * 1000, torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0],
                         device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    ms, peak_mem = worst.tolist()
    tps = args.batch * args.seq / args.tp / (ms / 1000)
    peak = peak_flops(device, fp8=False)
    del model, opt
    return {
        "tokens_per_s": tps,
        "ms_per_step": ms,
        "mfu_bf16_peak": mfu(tps, flops_per_token(cfg, args.seq), peak) if peak else float("nan"),
        "peak_mem_gib": peak_mem if cuda else float("nan"),
        "final_loss": final_loss,
        "warmup_s": warmup_s,
        "fp8_layers": n_fp8,
    }


def print_table(title: str, results: dict[str, dict[str, Any]]) -> None:
    """``case  tok/s  speedup  MFU  peak GiB  fp8 layers``; speedup relative to the bf16 case ("n/a"
    when ``--cases`` has none)."""
    ref = results["bf16"]["tokens_per_s"] if "bf16" in results else None
    print(f"\n{title}")
    print(f"{'case':>16} {'tok/s/GPU':>10} {'speedup':>8} {'MFU':>6} {'peak GiB':>9} {'fp8 layers':>10}")
    for name, r in results.items():
        speedup = f"{r['tokens_per_s'] / ref:7.2f}x" if ref else f"{'n/a':>8}"
        print(f"{name:>16} {r['tokens_per_s']:10.0f} {speedup} {r['mfu_bf16_peak']:6.3f} "
              f"{r['peak_mem_gib']:9.1f} {r['fp8_layers']:10d}")


def _init_distributed(cpu: bool) -> torch.device:
    backend = "gloo" if cpu else "nccl"
    if "RANK" in os.environ:  # torchrun
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cpu") if cpu else torch.device("cuda", local)
        if not cpu:
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
        return device
    with socket.socket() as s:  # plain `python`: a world of one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return torch.device("cpu") if cpu else torch.device("cuda", 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_1b", choices=LlamaConfig.names())
    p.add_argument("--batch", type=int, default=8, help="sequences per GPU per step")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="bf16, <recipe> or <recipe>+ag")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager blocks")
    p.add_argument("--no-auto-filter", dest="auto_filter", action="store_false",
                   help="convert every linear but lm_head (default: bench_train.py's auto filter on CUDA)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per data-parallel group (divides the world)")
    p.add_argument("--cpu", action="store_true", help="smoke-test on CPU with gloo (numbers meaningless)")
    p.add_argument("--out", default="bench_fsdp.json")
    args = p.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("bench_fsdp.py needs CUDA GPUs (or --cpu for a smoke test)")
    for name in args.cases:  # fail on a bad case before building anything
        try:
            case_config(name, args.cpu)
        except ValueError as e:
            raise SystemExit(f"bench_fsdp.py: {e}") from None
    if args.cpu:
        torch.set_num_threads(1)
    device = _init_distributed(args.cpu)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.tp < 1 or world % args.tp:
        raise SystemExit(f"bench_fsdp.py: --tp {args.tp} must be a positive divisor of the world size {world}")
    mesh = init_device_mesh(device.type, (world // args.tp, args.tp), mesh_dim_names=("data_parallel", "tensor_parallel"))
    cfg = LlamaConfig.from_name(args.model, max_seq_len=max(args.seq, 1))
    results = {}
    for name in args.cases:
        results[name] = r = run_case(name, cfg, args, mesh, device)
        if rank == 0:
            print(f"{name}: {r['tokens_per_s']:.0f} tok/s/GPU, {r['ms_per_step']:.1f} ms/step, MFU {r['mfu_bf16_peak']:.3f}, "
                  f"peak {r['peak_mem_gib']:.1f} GiB, loss {r['final_loss']:.3f}, warmup {r['warmup_s']:.0f}s", flush=True)
    if rank == 0:
        info = meta(world_size=world, tensor_parallel=args.tp, model=args.model, batch_per_gpu=args.batch, seq=args.seq,
                    compile=args.compile, auto_filter=args.auto_filter and device.type == "cuda")
        if device.type == "cpu":
            info["device"] = "cpu"
        with open(args.out, "w") as f:
            json.dump({"meta": info, "results": results}, f, indent=2)
        optimizer = "fused AdamW" if device.type == "cuda" else "AdamW"
        layout = f"FSDP2 x {world // args.tp}" + (f" x TP {args.tp}" if args.tp > 1 else "")
        per = "per GPU" if args.tp == 1 else f"per TP group of {args.tp}"
        print_table(f"{args.model} {layout} ({info['device']}), batch {args.batch} x seq {args.seq} {per}, "
                    f"{optimizer}, {'compiled' if args.compile else 'eager'}, torch {info['torch']}, {info['date']}; "
                    f"tok/s and MFU per GPU", results)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

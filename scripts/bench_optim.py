"""Optimizer-state memory and throughput of the built-in Llama: AdamW vs AdamWFp8 (+ fp8 reduce-scatter).

    python scripts/bench_optim.py                                  # llama_1b, 1 GPU, batch 8 x seq 2048
    torchrun --nproc_per_node=2 scripts/bench_optim.py             # FSDP2 over 2 GPUs, adds adamw_fp8_rs
    python scripts/bench_optim.py --cases adamw adamw_fp8 adamw_fp8_torch   # kernel vs compiled torch path

Cases (``--cases``):

==================  ================================================================  ==============
case                optimizer                                                         state B/param
==================  ================================================================  ==============
``adamw``           ``torch.optim.AdamW(fused=True)``                                  8
``adamw_fp8``       ``AdamWFp8()``: m e4m3 (block 128), v bf16; the Triton kernel on GPU  3.03
``adamw_fp8_v8``    ``AdamWFp8(second_moment="fp8")``                                  2.06
``adamw_fp8_torch`` ``AdamWFp8(fused=False, compile=True)``: the compiled torch path    3.03
``adamw_fp8_eager`` ``AdamWFp8(fused=False)``: eager torch ops                         3.03
``adamw_fp8_rs``    ``adamw_fp8`` + fp8 gradient reduce-scatter (FSDP2, 2+ ranks)      3.03
==================  ================================================================  ==============

One process: the model is unsharded, compiled whole, every linear but ``lm_head`` in fp8
(``--fp8``, ``bf16`` for none), bf16 autocast, random tokens — ``bench_train.py``'s setting.
Under ``torchrun`` (``WORLD_SIZE`` > 1): FSDP2 as ``trainer=fsdp2`` does it (each block
compiled, then ``fully_shard``; bf16 all-gather, fp32 reduce-scatter), each rank its own batch.

Per case: tokens/s (all ranks), ms/step, peak memory (max over ranks), and the bytes this rank
holds of optimizer state and of gradients (measured from the tensors, after a step): the issue's
"optimizer + gradient memory" (fp32 grads: 4 B/param; AdamW 8 + 4 = 12, AdamWFp8 3.03 + 4).
A table is printed last (rank 0) and the raw numbers written as JSON (``--out``).

``--device cpu`` runs the same code on CPU (gloo under torchrun) with emulated fp8, for a smoke
test of the script itself (``--model llama_tiny``); its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import meta, time_steps  # noqa: E402

import fp8train  # noqa: E402
from fp8train.models.llama import Llama, LlamaConfig  # noqa: E402
from fp8train.optim import AdamWFp8  # noqa: E402
from fp8train.reduce_scatter import enable_fp8_reduce_scatter  # noqa: E402

CASES = ("adamw", "adamw_fp8", "adamw_fp8_v8", "adamw_fp8_torch", "adamw_fp8_eager", "adamw_fp8_rs")


def _local_bytes(tensors: Any) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of tensor state this rank holds (local shards), step counters excluded."""
    return _local_bytes(t for st in opt.state.values() for k, t in st.items()
                        if k != "step" and isinstance(t, torch.Tensor))


def make_optimizer(case: str, params: Any) -> torch.optim.Optimizer:
    kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    if case == "adamw":
        return torch.optim.AdamW(params, fused=torch.cuda.is_available(), **kw)
    second = "fp8" if case == "adamw_fp8_v8" else "bf16"
    torch_path = case in ("adamw_fp8_torch", "adamw_fp8_eager")
    # compile=True matters only where the kernel does not run (CPU smoke tests, the torch cases)
    return AdamWFp8(params, second_moment=second, fused=False if torch_path else None,
                    compile=case != "adamw_fp8_eager", **kw)


def build_model(cfg: LlamaConfig, recipe: str, device: torch.device, mesh: Any, fp8_rs: bool,
                compile: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    convert = recipe != "bf16"
    fp8_config = fp8train.Float8LinearConfig.from_recipe_name(recipe, emulate=device.type == "cpu") if convert else None
    skip_head = lambda m, fqn: fqn != "lm_head"  # noqa: E731
    if mesh is None:
        model = Llama(cfg).to(device)
        if convert:
            fp8train.convert_to_float8_training(model, config=fp8_config, module_filter_fn=skip_head)
        return model
    from fp8train.train.parallel import apply_fsdp2, materialize

    with torch.device("meta"):
        model = Llama(cfg)
    if convert:
        fp8train.convert_to_float8_training(model, config=fp8_config, module_filter_fn=skip_head)
    if compile:
        for block in model.layers:
            block.compile()
    apply_fsdp2(model, mesh, "bf16-mixed" if device.type == "cuda" else "32-true")
    if fp8_rs:
        enable_fp8_reduce_scatter(model)
    materialize(model, device)
    return model


def run_case(case: str, args: argparse.Namespace, cfg: LlamaConfig, device: torch.device, mesh: Any) -> dict[str, float]:
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg, args.fp8, device, mesh, fp8_rs=case == "adamw_fp8_rs", compile=not args.eager)
    delayed = args.fp8 != "bf16" and fp8train.Float8LinearConfig.from_recipe_name(args.fp8).has_delayed
    forward = torch.compile(model) if mesh is None and not args.eager else model
    opt = make_optimizer(case, model.parameters())
    rank = dist.get_rank() if dist.is_initialized() else 0
    g = torch.Generator(device=device).manual_seed(rank)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device, generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    grad_bytes = [0]

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = forward(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        if delayed:
            fp8train.sync_float8_amax_and_scale_history(model)
        grad_bytes[0] = _local_bytes(p.grad for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    sec_per_step, warmup_s, loss = time_steps(step, args.warmup, args.steps)
    world = dist.get_world_size() if dist.is_initialized() else 1
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    if dist.is_initialized():
        t = torch.tensor([peak], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        peak = float(t)
    state = optimizer_state_bytes(opt)
    local_params = _local_bytes(model.parameters()) / 4  # fp32 parameters: elements
    result = {
        "tokens_per_s": world * args.batch * args.seq / sec_per_step,
        "ms_per_step": sec_per_step * 1000,
        "peak_mem_gib": peak,
        "optim_state_gib": state / 2**30,
        "grad_gib": grad_bytes[0] / 2**30,
        "optim_state_bytes_per_param": state / local_params,
        "final_loss": loss,
        "warmup_s": warmup_s,
    }
    del model, forward, opt
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_1b", choices=LlamaConfig.names())
    p.add_argument("--batch", type=int, default=8, help="sequences per rank")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--fp8", default="tensorwise", choices=["bf16"] + fp8train.recipe_names())
    p.add_argument("--cases", nargs="+", default=None, choices=CASES,
                   help="default: adamw adamw_fp8 adamw_fp8_v8 (+ adamw_fp8_rs under torchrun)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--eager", action="store_true", help="no torch.compile of the model (the optimizer: see --cases)")
    p.add_argument("--out", default="bench_optim.json")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_optim.py needs a CUDA GPU (or --device cpu for a smoke test)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mesh = None
    if world > 1:
        local = int(os.environ["LOCAL_RANK"])
        if args.device == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(args.device, (world,))
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    cases = args.cases or ["adamw", "adamw_fp8", "adamw_fp8_v8"] + (["adamw_fp8_rs"] if world > 1 else [])
    if "adamw_fp8_rs" in cases and world == 1:
        raise SystemExit("adamw_fp8_rs needs 2+ ranks: run under torchrun --nproc_per_node=N")
    cfg = LlamaConfig.from_name(args.model, max_seq_len=max(args.seq, 1))
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    results = {}
    for case in cases:
        results[case] = r = run_case(case, args, cfg, device, mesh)
        if rank0:
            print(f"{case}: {r['tokens_per_s']:.0f} tok/s, {r['ms_per_step']:.1f} ms/step, peak {r['peak_mem_gib']:.2f} GiB, "
                  f"optimizer state {r['optim_state_gib']:.3f} GiB ({r['optim_state_bytes_per_param']:.2f} B/param), "
                  f"grads {r['grad_gib']:.3f} GiB, loss {r['final_loss']:.3f}, warmup {r['warmup_s']:.0f}s", flush=True)
    if rank0:
        info = meta(model=args.model, batch_per_rank=args.batch, seq=args.seq, fp8=args.fp8, world_size=world,
                    sharding="fsdp2" if mesh is not None else "none")
        with open(args.out, "w") as f:
            json.dump({"meta": info, "results": results}, f, indent=2)
        base = results.get("adamw")
        print(f"\n{args.model}, {world} rank(s), batch {args.batch} x seq {args.seq} per rank, fp8 {args.fp8} "
              f"({info['device']}, torch {info['torch']}, {info['date']}, {info['sharding']})")
        print(f"{'case':>16} {'tok/s':>10} {'vs adamw':>8} {'peak GiB':>9} {'state GiB':>10} {'B/param':>8} "
              f"{'state+grad GiB':>15} {'vs adamw':>8}")
        for case, r in results.items():
            sg = r["optim_state_gib"] + r["grad_gib"]
            rel_t = f"{r['tokens_per_s'] / base['tokens_per_s']:7.3f}x" if base else "n/a"
            rel_m = f"{sg / (base['optim_state_gib'] + base['grad_gib']) - 1:+8.1%}" if base else "n/a"
            print(f"{case:>16} {r['tokens_per_s']:10.0f} {rel_t:>8} {r['peak_mem_gib']:9.2f} {r['optim_state_gib']:10.3f} "
                  f"{r['optim_state_bytes_per_param']:8.2f} {sg:15.3f} {rel_m:>8}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

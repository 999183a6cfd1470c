"""FSDP2 / tensor parallel / DCP runs of a small fp8 model on CPU ranks (gloo), for tests/test_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node=2 distributed_fp8.py SCENARIO OUT_DIR

Scenarios (each rank writes ``OUT_DIR/{scenario}_rank{r}.pt``):

* ``fsdp``: FSDP2 with and without fp8 all-gather (with and without the fused precompute), for
  tensorwise and delayed scaling, against the same model unsharded in one process on the whole
  batch; records global losses, final weights, fp8 buffers and which all-reduces ran.
* ``tp``: Float8ColwiseParallel / Float8RowwiseParallel (plain and sequence parallel) and
  PyTorch's own styles, against the single-process model.
* ``fsdp_tp``: 2-D mesh (data parallel x tensor parallel, 4 ranks), fp8 all-gather on.
* ``dcp``: FSDP2 + fp8 all-gather, torch.distributed.checkpoint save after 3 steps, then 3 more
  steps; a fresh model loads the checkpoint and runs the same 3 steps.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import fp8train
from fp8train.fsdp import Float8AllGatherWeight
from fp8train.tp import Float8ColwiseParallel, Float8RowwiseParallel

D, HIDDEN, BATCH, SEQ, STEPS, LR = 32, 64, 4, 8, 4, 1e-2

# which function issued each all-reduce: tells the fused precompute from per-layer fallbacks
ALL_REDUCE_CALLERS: Counter = Counter()
_all_reduce = dist.all_reduce


def _counting_all_reduce(*args, **kwargs):
    ALL_REDUCE_CALLERS[sys._getframe(1).f_code.co_name] += 1
    return _all_reduce(*args, **kwargs)


dist.all_reduce = _counting_all_reduce

# which function cast each FSDP2 weight shard to fp8: the fused precompute's precast or an all-gather
CAST_CALLERS: Counter = Counter()
_cast_shard = fp8train.fsdp._cast_shard


def _counting_cast_shard(*args, **kwargs):
    CAST_CALLERS[sys._getframe(1).f_code.co_name] += 1
    return _cast_shard(*args, **kwargs)


fp8train.fsdp._cast_shard = _counting_cast_shard
_SELF = None  # a process group of this rank alone: the reference model syncs without collectives


class Block(nn.Module):
    """``x + w2(relu(w1(norm(x))))``: a norm (high precision, in the same FSDP group) and two fp8 linears."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.w1 = nn.Linear(D, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w2(F.relu(self.w1(self.norm(x))))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def build(recipe: str | None, all_gather: bool = False) -> nn.Module:
    """The test model, converted to fp8 with ``recipe`` (``None``: left in high precision)."""
    torch.manual_seed(0)
    model = Model()
    if recipe is None:
        return model
    config = fp8train.Float8LinearConfig.from_recipe_name(recipe, enable_fsdp_float8_all_gather=all_gather)
    fp8train.convert_to_float8_training(model, config=config)
    return model


def batches(n: int = STEPS, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, SEQ, D, generator=g), torch.randn(BATCH, SEQ, D, generator=g)) for _ in range(n)]


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for n, p in model.named_parameters()}


def train(model: nn.Module, data: list, step_inputs, after_step=None, optimizer=None,
          sum_plain_grads: bool = False, first_grads: dict | None = None, sync_group=None) -> list[float]:
    """AdamW steps; ``step_inputs(x, y) -> (x_local, y_local, loss_divisor)``; returns global losses
    (the mean over ranks of each rank's loss: every rank's share of the batch is the same size).
    ``loss_divisor`` is the number of ranks whose gradients add up (sequence parallelism); FSDP2
    averages over its data-parallel ranks itself.

    ``sum_plain_grads``: all-reduce the gradients of non-DTensor parameters (sequence parallelism:
    each rank's norm and head saw only its slice of the sequence). ``first_grads`` receives the
    gradients of the first step (whole tensors). ``sync_group``: delayed scaling's reduction group
    (default: the world)."""
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for x, y in data:
        xl, yl, div = step_inputs(x, y)
        loss = F.mse_loss(model(xl), yl)
        (loss / div).backward()
        if sum_plain_grads:
            for p in model.parameters():
                if not isinstance(p, DTensor) and p.grad is not None:
                    _all_reduce(p.grad)
        if first_grads is not None and not first_grads:
            first_grads.update(full_grads(model))
        fp8train.sync_float8_amax_and_scale_history(model, process_group=sync_group)
        opt.step()
        opt.zero_grad()
        if after_step is not None:
            after_step(model)
        total = loss.detach().clone()  # every rank's loss is over an equal share: the mean is the global loss
        if dist.is_initialized():
            _all_reduce(total)
            total /= dist.get_world_size()
        losses.append(total.item())
    return losses


def reference(recipe: str | None, data: list, first_grads: dict | None = None) -> list[float]:
    """The same model unsharded, on the whole batch, in this process (no collectives)."""
    model, losses = build(recipe), []
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for x, y in data:
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if first_grads is not None and not first_grads:
            first_grads.update(full_grads(model))
        fp8train.sync_float8_amax_and_scale_history(model, process_group=_SELF)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def fp8_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.to_local() if isinstance(v, DTensor) else v).clone() for k, v in model.state_dict().items() if ".fp8_" in k}


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in sd.items() if ".fp8_" not in k}


def shard_fsdp(model: Model, mesh) -> None:
    for b in model.blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)


def scenario_fsdp(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    data = batches()
    hp_grads: dict = {}
    reference(None, data[:1], hp_grads)
    dp = lambda x, y: (x.chunk(world)[rank], y.chunk(world)[rank], 1)  # noqa: E731
    out: dict = {"hp_grads": hp_grads}
    for recipe in ("tensorwise", "delayed"):
        runs = {}
        # (name, fp8 all-gather, precompute: "each step" | "once" | None, compiled blocks)
        for name, all_gather, precompute, compiled in (
            ("off", False, None, False), ("on", True, "each step", False), ("on_no_precompute", True, None, False),
            ("on_precompute_once", True, "once", False), ("on_compiled", True, "each step", True),
        ):
            model = build(recipe, all_gather)
            if compiled:
                for b in model.blocks:
                    b.compile(backend="aot_eager")  # inductor works too (bit-identical), but compiles slowly on CPU
            shard_fsdp(model, mesh)
            wrapped = isinstance(model.blocks[0].w1.weight.to_local(), Float8AllGatherWeight)
            if precompute is not None:  # before the first step too, as the Lightning callback does at train start
                fp8train.precompute_float8_dynamic_scale_for_fsdp(model)
            after = fp8train.precompute_float8_dynamic_scale_for_fsdp if precompute == "each step" else None
            ALL_REDUCE_CALLERS.clear()
            CAST_CALLERS.clear()
            grads: dict = {}
            losses = train(model, data, dp, after, first_grads=grads)
            sd_types = {type(v.to_local() if isinstance(v, DTensor) else v).__name__ for v in model.state_dict().values()}
            runs[name] = {"losses": losses, "wrapped": wrapped, "grads": grads, "all_reduces": dict(ALL_REDUCE_CALLERS),
                          "casts": dict(CAST_CALLERS), "weights": full_weights(model), "fp8": fp8_buffers(model), "state_dict_types": sd_types}
        ref_grads: dict = {}
        runs["reference"] = {"losses": reference(recipe, data, ref_grads), "grads": ref_grads}
        out[recipe] = runs
    return out


def tp_plan(kind: str) -> dict:
    if kind == "stock":
        return {"w1": ColwiseParallel(), "w2": RowwiseParallel()}
    if kind == "sp":  # sequence parallel: x sharded along the sequence between blocks
        return {"w1": Float8ColwiseParallel(input_layouts=Shard(1)), "w2": Float8RowwiseParallel(output_layouts=Shard(1))}
    return {"w1": Float8ColwiseParallel(), "w2": Float8RowwiseParallel()}


def scenario_tp(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    data = batches()
    hp_grads: dict = {}
    reference(None, data[:1], hp_grads)
    out: dict = {"hp_grads": hp_grads}
    for recipe, kind in (("tensorwise", "tp"), ("tensorwise", "sp"), ("delayed", "tp"), ("delayed", "sp"),
                         ("delayed", "stock"), ("rowwise", "tp")):
        model = build(recipe)
        for b in model.blocks:
            parallelize_module(b, mesh, tp_plan(kind))
        if kind == "sp":  # each rank holds a slice of the sequence; the loss is the mean of the slices'
            inputs = lambda x, y: (x.chunk(world, 1)[rank], y.chunk(world, 1)[rank], world)  # noqa: E731
        else:
            inputs = lambda x, y: (x, y, 1)  # noqa: E731
        grads: dict = {}
        ref_grads: dict = {}
        losses = train(model, data, inputs, sum_plain_grads=kind == "sp", first_grads=grads)
        out[f"{recipe}/{kind}"] = {"losses": losses, "reference": reference(recipe, data, ref_grads),
                                   "fp8": fp8_buffers(model), "weights": full_weights(model),
                                   "grads": grads, "reference_grads": ref_grads,
                                   "weight_type": type(model.blocks[0].w1.weight).__name__}
    return out


def scenario_fsdp_tp(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh.get_local_rank("dp")
    data = batches()
    hp_grads: dict = {}
    reference(None, data[:1], hp_grads)
    out: dict = {"hp_grads": hp_grads}
    for recipe in ("tensorwise", "delayed"):
        model = build(recipe, all_gather=True)
        for b in model.blocks:
            parallelize_module(b, mesh["tp"], tp_plan("tp"))
        shard_fsdp(model, mesh["dp"])
        local = model.blocks[0].w1.weight.to_local()
        n = world // 2
        inputs = lambda x, y: (x.chunk(n)[dp_rank], y.chunk(n)[dp_rank], 1)  # noqa: E731
        fp8train.precompute_float8_dynamic_scale_for_fsdp(model)
        ALL_REDUCE_CALLERS.clear()
        CAST_CALLERS.clear()
        grads: dict = {}
        ref_grads: dict = {}
        losses = train(model, data, inputs, fp8train.precompute_float8_dynamic_scale_for_fsdp, first_grads=grads,
                       sync_group=mesh)  # delayed: amax MAX over the whole 2-D mesh, one all-reduce per dim
        out[recipe] = {"losses": losses, "all_reduces": dict(ALL_REDUCE_CALLERS), "casts": dict(CAST_CALLERS),
                       "grads": grads,
                       "reference": reference(recipe, data, ref_grads), "reference_grads": ref_grads,
                       "fp8": fp8_buffers(model), "weights": full_weights(model),
                       "placements": str(model.blocks[0].w1.weight.placements),
                       "local_type": type(local).__name__}
    return out


def scenario_dcp(rank: int, world: int, out_dir: str) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    data = batches(6)
    dp = lambda x, y: (x.chunk(world)[rank], y.chunk(world)[rank], 1)  # noqa: E731
    out: dict = {}
    for recipe in ("delayed", "tensorwise"):
        precompute = fp8train.precompute_float8_dynamic_scale_for_fsdp
        model = build(recipe, all_gather=True)
        shard_fsdp(model, mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        first = train(model, data[:3], dp, precompute, opt)
        path = os.path.join(out_dir, f"ckpt_{recipe}")
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=path)
        saved_fp8 = fp8_buffers(model)
        uninterrupted = train(model, data[3:], dp, precompute, opt)

        fresh = build(recipe, all_gather=True)
        torch.manual_seed(123)
        with torch.no_grad():  # make sure nothing of the fresh init survives the load
            for p in fresh.parameters():
                p.normal_()
        shard_fsdp(fresh, mesh)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=LR)
        state = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(fresh, state["model"])
        set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
        loaded_fp8 = fp8_buffers(fresh)
        initialized = [m.is_amax_initialized for m in fresh.modules() if hasattr(m, "is_amax_initialized")]
        precompute(fresh)
        resumed = train(fresh, data[3:], dp, precompute, fresh_opt)
        out[recipe] = {"first": first, "uninterrupted": uninterrupted, "resumed": resumed, "saved_fp8": saved_fp8,
                       "loaded_fp8": loaded_fp8, "amax_initialized": initialized,
                       "wrapped": isinstance(fresh.blocks[0].w1.weight.to_local(), Float8AllGatherWeight),
                       "files": sorted(os.listdir(path))}
    return out


def scenario_edits(rank: int, world: int, out_dir: str) -> dict:
    """Weights changed after the fused precompute, other than by an optimizer step: the next
    forward must use the new weights. Per edit, the output with fp8 all-gather against the same
    model with bf16 all-gather (bit-identical whenever both see the same weights)."""
    mesh = init_device_mesh("cpu", (world,))
    x = batches(1)[0][0].chunk(world)[rank]
    out: dict = {}
    for edit in ("none", "mul_", "load_state_dict", "set_model_state_dict", "dcp_load", "init"):
        outputs = {}
        for all_gather in (False, True):
            model = build("tensorwise", all_gather)
            shard_fsdp(model, mesh)
            opt = torch.optim.AdamW(model.parameters(), lr=LR)
            F.mse_loss(model(x), x).backward()
            opt.step()
            fp8train.precompute_float8_dynamic_scale_for_fsdp(model)  # scales and fp8 bytes cached
            with torch.no_grad():
                if edit == "mul_":
                    for p in model.parameters():
                        p.mul_(-0.5)
                elif edit == "load_state_dict":
                    model.load_state_dict({k: v * -0.5 for k, v in model.state_dict().items()})
                elif edit == "set_model_state_dict":
                    set_model_state_dict(model, {k: v * -0.5 for k, v in get_model_state_dict(model).items()})
                elif edit == "dcp_load":  # what resuming from a sharded checkpoint does
                    path = os.path.join(out_dir, f"edits_{all_gather}")
                    dcp.save({"model": {k: v * -0.5 for k, v in get_model_state_dict(model).items()}},
                             checkpoint_id=path)
                    state = {"model": get_model_state_dict(model)}
                    dcp.load(state, checkpoint_id=path)
                    set_model_state_dict(model, state["model"])
                elif edit == "init":
                    torch.manual_seed(7)
                    for p in model.parameters():
                        nn.init.normal_(p)
                outputs[all_gather] = model(x)
        out[edit] = {"same": torch.equal(outputs[True], outputs[False]),
                     "diff": (outputs[True] - outputs[False]).abs().max().item()}
    return out


def main(scenario: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    global _SELF
    for r in range(world):  # every rank takes part in creating every group
        group = dist.new_group([r])
        if r == rank:
            _SELF = group
    if scenario in ("dcp", "edits"):
        result = {"dcp": scenario_dcp, "edits": scenario_edits}[scenario](rank, world, out_dir)
    else:
        result = {"fsdp": scenario_fsdp, "tp": scenario_tp, "fsdp_tp": scenario_fsdp_tp}[scenario](rank, world)
    torch.save(result, os.path.join(out_dir, f"{scenario}_rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

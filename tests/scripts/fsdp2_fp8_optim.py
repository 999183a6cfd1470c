"""AdamWFp8 and the fp8 reduce-scatter under FSDP2 on 2 CPU ranks (gloo); each rank saves what it measured.

Run with ``python -m torch.distributed.run --standalone --nproc_per_node=2 fsdp2_fp8_optim.py OUT_DIR``;
each rank writes ``OUT_DIR/rank{r}.pt``. ``tests/test_optim_fsdp2.py`` checks them:

* ``optim``: an FSDP2 model (``fully_shard`` per linear + root; one weight with an uneven row
  split) trained with AdamWFp8 (round-to-nearest, so both runs are deterministic) against the
  same model unsharded on the concatenated batch: final parameter and moment differences, state
  placements.
* ``dcp``: ``torch.distributed.checkpoint`` save of model + optimizer (``get_state_dict``), one
  more step; then a differently initialised model + optimizer loaded with ``set_state_dict`` takes
  the same step: the parameters must match bit for bit.
* ``rs``: one backward with the fp8 reduce-scatter against the default one (gradient SQNR), and
  20 AdamW steps with each (loss curves).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from fp8train.blockwise import E4M3, dequantize_blockwise
from fp8train.optim import AdamWFp8
from fp8train.reduce_scatter import enable_fp8_reduce_scatter

STEPS = 12
BATCH = 16  # per rank


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # 23 output rows: the weight splits 12/11 over two ranks (FSDP2 pads the shorter shard)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 23), nn.GELU(),
                         nn.Linear(23, 8))


def shard(model: nn.Module, mesh) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH, 32, generator=g)
    return x, torch.tanh(x[:, :8]) + 0.1 * torch.randn(BATCH, 8, generator=g)


def full_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [batch(step, r) for r in range(dist.get_world_size())]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = F.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor in fp32 (upcast before the all-gather: gloo has no fp8 or bf16 collectives)."""
    if isinstance(t, DTensor):
        t = DTensor.from_local(t.to_local().float(), t.device_mesh, t.placements, shape=t.shape,
                               stride=t.stride()).full_tensor()
    return t.detach().float().clone()


def decoded(state: dict, key: str, gather) -> torch.Tensor:
    """A moment as fp32 values (fp8 data times its block scales)."""
    data = gather(state[key])
    if key + "_scale" not in state:
        return data.float()
    scale = gather(state[key + "_scale"])
    return dequantize_blockwise(data.to(E4M3).reshape(-1, data.shape[-1]), scale.reshape(-1, scale.shape[-1]), 128)


def optim_parity(mesh, rank: int) -> dict:
    kw = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, stochastic_rounding=False)
    sharded = shard(make_model(0), mesh)
    ref = make_model(0)
    opt, opt_ref = AdamWFp8(sharded.parameters(), **kw), AdamWFp8(ref.parameters(), **kw)
    for step in range(STEPS):
        train_step(sharded, opt, *batch(step, rank))
        train_step(ref, opt_ref, *full_batch(step))
    out = {"param": {}, "exp_avg": {}, "exp_avg_sq": {}, "placements_match": True, "dtensor_states": True}
    for (name, p), p_ref in zip(sharded.named_parameters(), ref.parameters()):
        out["param"][name] = ((full(p) - p_ref.detach()).abs().max().item(), p_ref.detach().abs().max().item())
        st, st_ref = opt.state[p], opt_ref.state[p_ref]
        for key in ("exp_avg", "exp_avg_sq"):
            got, want = decoded(st, key, full), decoded(st_ref, key, lambda t: t)
            out[key][name] = ((got - want).abs().max().item(), want.abs().max().item())
        for key, t in st.items():
            if key == "step":
                continue
            out["dtensor_states"] &= isinstance(t, DTensor)
            if isinstance(t, DTensor):
                out["placements_match"] &= t.placements == p.placements and t.device_mesh == p.device_mesh
        out.setdefault("dtypes", {})[name] = {k: str(v.dtype) for k, v in st.items() if k != "step"}
    out["bytes"] = opt.state_bytes()
    return out


def dcp_round_trip(mesh, rank: int, ckpt_dir: str) -> dict:
    kw = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, stochastic_rounding=True)
    model = shard(make_model(0), mesh)
    opt = AdamWFp8(model.parameters(), **kw)
    for step in range(4):
        train_step(model, opt, *batch(step, rank))
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
    torch.manual_seed(77)  # stochastic rounding draws from the default generator
    train_step(model, opt, *batch(4, rank))
    want = [full(p) for p in model.parameters()]

    fresh = shard(make_model(1), mesh)
    fresh_opt = AdamWFp8(fresh.parameters(), **kw)
    msd, osd = get_state_dict(fresh, fresh_opt)  # templates (initialises the optimizer state)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=ckpt_dir)
    set_state_dict(fresh, fresh_opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    dtypes = {k: str(v.dtype) for k, v in fresh_opt.state[next(iter(fresh.parameters()))].items()}
    steps = [float(s["step"]) for s in fresh_opt.state.values()]
    torch.manual_seed(77)
    train_step(fresh, fresh_opt, *batch(4, rank))
    got = [full(p) for p in fresh.parameters()]
    return {"bitwise": all(torch.equal(a, b) for a, b in zip(want, got)),
            "max_diff": max((a - b).abs().max().item() for a, b in zip(want, got)),
            "loaded_dtypes": dtypes, "loaded_steps": steps}


def reduce_scatter_parity(mesh, rank: int) -> dict:
    models = {name: shard(make_model(0), mesh) for name in ("default", "fp8")}
    enabled = enable_fp8_reduce_scatter(models["fp8"])
    x, y = batch(0, rank)
    grads = {}
    for name, model in models.items():
        F.mse_loss(model(x), y).backward()
        grads[name] = [full(p.grad) for p in model.parameters()]
    sqnr = []
    for a, b in zip(grads["default"], grads["fp8"]):
        sqnr.append((10 * torch.log10(a.pow(2).sum() / (a - b).pow(2).sum().clamp(min=1e-30))).item())
    losses = {}
    for name, model in models.items():
        model.zero_grad()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
        losses[name] = [train_step(model, opt, *batch(s, rank)) for s in range(1, 21)]
    return {"enabled": enabled, "grad_sqnr_db": sqnr, "losses": losses}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    result = {
        "optim": optim_parity(mesh, rank),
        "dcp": dcp_round_trip(mesh, rank, os.path.join(out_dir, "ckpt")),
        "rs": reduce_scatter_parity(mesh, rank),
        "world_size": dist.get_world_size(),
    }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

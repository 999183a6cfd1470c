"""``apply_tensor_parallel`` on the built-in Llama on CPU ranks (gloo), for tests/test_tensor_parallel.py.

    python -m torch.distributed.run --standalone --nproc_per_node=2 llama_tp.py OUT_DIR

For each case (fp32, no fp8; tensorwise with some layers left in high precision; delayed), every rank
trains the tensor-parallel model for a few AdamW steps on the same batches, and the same model
unsharded in this process (no collectives) trains alongside. Rank ``r`` writes
``OUT_DIR/rank{r}.pt``: per-step losses of both, first-step gradients of both (whole tensors),
the final weights and fp8 buffers, the weights' types and placements. Also records the errors
``apply_tensor_parallel`` raises for a model it cannot split and for a 2-D mesh.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import fp8train
from fp8train.models.llama import Llama, LlamaConfig
from fp8train.train.parallel import apply_tensor_parallel

# GQA (2 kv heads for 4 query heads): each rank holds 2 query heads and 1 kv head
CONFIG = LlamaConfig.from_name("llama_tiny", n_layers=2, n_kv_heads=2, max_seq_len=32)
BATCH, SEQ, STEPS, LR = 4, 32, 3, 1e-2
_SELF = None  # a process group of this rank alone: the reference's delayed sync runs without peers


def build(recipe: str | None) -> Llama:
    torch.manual_seed(0)
    model = Llama(CONFIG)
    if recipe is not None:
        config = fp8train.Float8LinearConfig.from_recipe_name(recipe, emulate=True)
        # tensorwise: wv and w3 stay nn.Linear (PyTorch's styles); lm_head is never converted
        skip = ("lm_head", "wv", "w3") if recipe == "tensorwise" else ("lm_head",)
        fp8train.convert_to_float8_training(
            model, config=config, module_filter_fn=lambda m, fqn: not fqn.endswith(skip), auto_filter=False
        )
    return model


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ), generator=g),
             torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ), generator=g)) for _ in range(STEPS)]


def whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train(model: Llama, group) -> tuple[list[float], dict[str, torch.Tensor]]:
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, grads = [], {}
    for x, y in batches():
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if not grads:
            grads = {n: whole(p.grad) for n, p in model.named_parameters()}
        fp8train.sync_float8_amax_and_scale_history(model, process_group=group)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads


def errors(mesh_2d) -> dict[str, str]:
    out = {}
    tp_mesh = mesh_2d["tp"]
    for name, cfg in (("n_heads", LlamaConfig(dim=64, n_layers=1, n_heads=1)),
                      ("n_kv_heads", LlamaConfig(dim=64, n_layers=1, n_heads=2, n_kv_heads=1)),
                      ("fuse_projections", LlamaConfig(dim=64, n_layers=1, n_heads=2, fuse_projections=True))):
        with torch.device("meta"):
            model = Llama(cfg)
        try:
            apply_tensor_parallel(model, tp_mesh)
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    with torch.device("meta"):
        model = Llama(LlamaConfig(dim=64, n_layers=1, n_heads=2))
    try:
        apply_tensor_parallel(model, mesh_2d)
        out["2-D mesh"] = "no error"
    except ValueError as e:
        out["2-D mesh"] = str(e)
    return out


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    global _SELF
    for r in range(world):  # every rank takes part in creating every group
        group = dist.new_group([r])
        if r == rank:
            _SELF = group
    mesh = init_device_mesh("cpu", (world,))
    out: dict = {}
    for recipe in (None, "tensorwise", "delayed"):
        model = build(recipe)
        apply_tensor_parallel(model, mesh)
        losses, grads = train(model, None)  # delayed: amax MAX over the world (= the TP group here)
        ref_losses, ref_grads = train(build(recipe), _SELF)
        attn, ffn = model.layers[0].attention, model.layers[0].feed_forward
        out[recipe or "fp32"] = {
            "losses": losses, "reference": ref_losses, "grads": grads, "reference_grads": ref_grads,
            "weights": {n: whole(p) for n, p in model.named_parameters()},
            "fp8": {k: v.clone() for k, v in model.state_dict().items() if ".fp8_" in k},
            "types": {n: type(getattr(attn, n)).__name__ for n in ("wq", "wk", "wv", "wo")}
            | {n: type(getattr(ffn, n)).__name__ for n in ("w1", "w2", "w3")},
            "placements": {n: str(getattr(attn, n).weight.placements) for n in ("wq", "wo")},
            "local_wq_shape": tuple(attn.wq.weight.to_local().shape),
            "replicated_type": type(model.lm_head.weight).__name__,
        }
    out["errors"] = errors(init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp")))
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

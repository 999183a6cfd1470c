"""Float8Training under Lightning's ModelParallelStrategy: ``configure_model`` converts, applies tensor
parallelism (fp8train.tp styles) and FSDP2 (fp8 all-gather), on CPU ranks (gloo).

    python -m torch.distributed.run --standalone --nproc_per_node=4 lightning_model_parallel.py RECIPES DP TP OUT_DIR

For each recipe (comma-separated), three fits: 2 epochs uninterrupted; 1 epoch (sharded checkpoint
saved); a fresh module resumed from that checkpoint for the 2nd epoch. Each rank writes
``OUT_DIR/rank{r}.pt`` with the losses and states of each fit; ``tests/test_distributed.py``
compares them.
"""

from __future__ import annotations

import glob
import os
import sys

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distributed_fp8 import Model, tp_plan  # noqa: E402

from fp8train import Float8LinearConfig  # noqa: E402
from fp8train.fsdp import Float8AllGatherWeight, _stamp  # noqa: E402
from fp8train.lightning import Float8Training  # noqa: E402

STEPS_PER_EPOCH = 3


def full_state(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in module.state_dict().items()}


class AtTrainStart(L.Callback):
    """The state a run starts training from (after any checkpoint restore)."""

    def on_train_start(self, trainer, pl_module):
        self.state = full_state(pl_module)
        self.optimizer = {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone()
                          for i, s in trainer.optimizers[0].state.items() for k, v in s.items()}


class ShardedModule(L.LightningModule):
    """The test model; ``configure_model`` in the documented order: convert -> TP -> FSDP2."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self.model: Model | None = None
        self.losses: list[float] = []

    def configure_model(self) -> None:
        if self.model is not None:
            return
        torch.manual_seed(self.seed)
        self.model = Model()
        for cb in self.trainer.callbacks:  # 1. fp8 (weights become Float8AllGatherWeight)
            if isinstance(cb, Float8Training):
                cb.convert(self)
        mesh = self.device_mesh
        for block in self.model.blocks:  # 2. tensor parallel
            parallelize_module(block, mesh["tensor_parallel"], tp_plan("tp"))
        for block in self.model.blocks:  # 3. FSDP2 over the data-parallel dim
            fully_shard(block, mesh=mesh["data_parallel"])
        fully_shard(self.model, mesh=mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.model(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    n = STEPS_PER_EPOCH * 4  # 4 samples per step over the data-parallel ranks
    data = TensorDataset(torch.randn(n, 8, 32, generator=g), torch.randn(n, 8, 32, generator=g))
    return DataLoader(data, batch_size=2)


def fit(root: str, recipe: str, dp: int, tp: int, epochs: int, ckpt_path: str | None = None, seed: int = 0):
    config = Float8LinearConfig.from_recipe_name(recipe, enable_fsdp_float8_all_gather=True)
    module = ShardedModule(seed)
    start = AtTrainStart()
    trainer = L.Trainer(
        accelerator="cpu", devices=dp * tp, strategy=ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp),
        max_epochs=epochs, callbacks=[Float8Training(config), start, ModelCheckpoint(dirpath=os.path.join(root, "ckpt"))],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=True,
    )
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    local = module.model.blocks[0].w1.weight._local_tensor  # the object FSDP2 calls (to_local() is a view)
    wrapped = isinstance(local, Float8AllGatherWeight)
    # the callback's precompute after the last optimizer step left a scale the next all-gather would use
    ready = (wrapped and local._precomputed_scale is not None
             and local._precomputed_at == _stamp(local, module.model.blocks[0].w1))
    return {"losses": module.losses, "state": full_state(module), "start": start.state, "wrapped": wrapped,
            "precomputed_scale_ready": ready}


def main(recipes: str, dp: int, tp: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    out = {}
    for recipe in recipes.split(","):
        root = os.path.join(out_dir, recipe)
        full = fit(os.path.join(root, "full"), recipe, dp, tp, epochs=2)
        first = fit(os.path.join(root, "first"), recipe, dp, tp, epochs=1)
        (path,) = glob.glob(os.path.join(root, "first", "ckpt", "*.ckpt"))
        resumed = fit(os.path.join(root, "resumed"), recipe, dp, tp, epochs=2, ckpt_path=path, seed=123)
        out[recipe] = {"full": full, "first": first, "resumed": resumed, "sharded_checkpoint": os.path.isdir(path)}
    torch.save(out, os.path.join(out_dir, f"rank{torch.distributed.get_rank()}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

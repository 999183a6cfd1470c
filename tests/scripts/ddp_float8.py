"""Train TinyMLP with Float8Training under DDP (2 CPU processes, gloo) and save each rank's fp8 state.

Run with ``python -m torch.distributed.run --standalone --nproc_per_node=2 ddp_float8.py OUT_DIR``; each rank
writes ``OUT_DIR/rank{r}.pt`` with its fp8 buffers, the input amax it saw per step, and the metrics the
callback computed (identical on every rank after the torchmetrics all-gather). ``tests/test_lightning_ddp.py``
compares them.
"""

from __future__ import annotations

import os
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lightning_models import TinyMLP, loader  # noqa: E402

from fp8train.lightning import Float8Training  # noqa: E402


class RecordingFloat8Training(Float8Training):
    """Keeps what each rank computed for the logs (only rank 0 writes to loggers)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.computed: dict[int, dict[str, list]] = {}

    def _log(self, trainer, host, events, step):
        self.computed[step] = host
        super()._log(trainer, host, events, step)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyMLP(scale_by_rank=True)  # rank r sees inputs scaled by r + 1: the local amax differ
    cb = RecordingFloat8Training("delayed", stats="detailed")
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=4, log_every_n_steps=2,
        callbacks=[cb], logger=L.pytorch.loggers.CSVLogger(out_dir), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, loader(n_batches=8))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(
        {"state": state, "input_amax": model.input_amax, "computed": cb.computed,
         "world_size": trainer.world_size, "backend": torch.distributed.get_backend()},
        os.path.join(out_dir, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])

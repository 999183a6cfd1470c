"""FSDP2 for ``trainer=fsdp2``: the strategy, per-block ``fully_shard``, and meta-device materialisation.

``FSDP2Strategy`` is Lightning's ``ModelParallelStrategy`` with pure data parallelism (all ranks
in one FSDP group, no tensor parallelism) as its default. ``LlamaLightningModule.configure_model``
calls :func:`apply_fsdp2` and :func:`materialize` when the strategy gives it a device mesh. It runs
on CUDA (NCCL) and on CPU (gloo; for tests).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override

from fp8train.delayed import register_delayed_buffers
from fp8train.linear import Float8Linear
from fp8train.models.llama import Llama

__all__ = ["FSDP2Strategy", "apply_fsdp2", "materialize"]


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` sharding every parameter across all ranks (FSDP2, no TP).

    Args:
        data_parallel_size: ranks per FSDP group; ``"auto"``: the world size (Lightning's own
            ``"auto"`` is the number of nodes, meant for 2D parallelism).
        tensor_parallel_size: must stay 1 (the Llama has no tensor-parallel plan).
        **kwargs: passed to ``ModelParallelStrategy`` (``save_distributed_checkpoint``, ...).

    Raises:
        ValueError: ``tensor_parallel_size`` other than 1.
    """

    def __init__(self, data_parallel_size: Any = "auto", tensor_parallel_size: int = 1, **kwargs: Any) -> None:
        if tensor_parallel_size != 1:
            raise ValueError(
                f"FSDP2Strategy(tensor_parallel_size={tensor_parallel_size!r}) is invalid; valid: 1 (fp8train's "
                f"Llama has no tensor-parallel plan)"
            )
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1, **kwargs)

    @override
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.world_size
        super().setup_environment()


def apply_fsdp2(model: Llama, mesh: Any, precision: str | None) -> None:
    """``fully_shard`` each transformer block, then the root (embedding, norm, ``lm_head``).

    With ``bf16-mixed`` parameters are all-gathered in bf16 and gradients reduced in fp32
    (``MixedPrecisionPolicy``), halving the all-gather traffic; autocast still decides op dtypes.
    The last block is not resharded after forward: backward needs it immediately.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
    kwargs: dict[str, Any] = {"mesh": dp_mesh}
    if precision is not None and str(precision).startswith("bf16"):
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        fully_shard(block, reshard_after_forward=i < last, **kwargs)
    fully_shard(model, **kwargs)


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a model built on the meta device (only this rank's shards) and initialise it.

    Weights get ``Llama.init_weights``; delayed-scaling buffers are registered afresh (zeros, scale
    1), as a freshly converted layer has them.
    """
    if not any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        return
    model.to_empty(device=device)
    for m in model.modules():
        if isinstance(m, Float8Linear) and m.config.has_delayed:
            register_delayed_buffers(m, m.config, device)
    if isinstance(model, Llama):
        model.init_weights()

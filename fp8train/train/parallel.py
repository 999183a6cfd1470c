"""FSDP2 and tensor parallelism for ``trainer=fsdp2``: the strategy, the Llama's TP plan, per-block
``fully_shard``, and meta-device materialisation.

``FSDP2Strategy`` is Lightning's ``ModelParallelStrategy`` with a 2-D device mesh
``(data_parallel, tensor_parallel)``; by default all ranks form one FSDP group and there is no
tensor parallelism. ``LlamaLightningModule.configure_model`` applies, when the strategy gives it
a mesh, in torchtitan's order::

    build on meta -> fp8 convert -> apply_tensor_parallel (tensor_parallel dim, if > 1)
        -> torch.compile -> apply_fsdp2 (data_parallel dim) -> materialize

It runs on CUDA (NCCL) and on CPU (gloo; for tests).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module
from typing_extensions import override

from fp8train.delayed import register_delayed_buffers
from fp8train.linear import Float8Linear
from fp8train.models.llama import Llama, LlamaConfig, RotaryEmbedding
from fp8train.tp import Float8ColwiseParallel, Float8RowwiseParallel

__all__ = [
    "FSDP2Strategy", "apply_fsdp2", "apply_tensor_parallel", "check_tensor_parallel", "clip_grad_norm_", "materialize",
]


def _is_pos_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for the Llama: FSDP2 over ``data_parallel``, TP over ``tensor_parallel``.

    Args:
        data_parallel_size: ranks per FSDP group; ``"auto"``: the world size divided by
            ``tensor_parallel_size`` (Lightning's own ``"auto"`` is the number of nodes).
        tensor_parallel_size: ranks sharing each block's attention heads and feed-forward hidden
            units (:func:`apply_tensor_parallel`); a positive integer dividing the world size.
            Tensor-parallel peers see the same batches. A TP group is consecutive ranks, so with
            ``tensor_parallel_size`` at most the GPUs per node it stays inside one node (TP
            all-reduces activations in every block: it needs the fast links).
        **kwargs: passed to ``ModelParallelStrategy`` (``save_distributed_checkpoint``, ...).

    Raises:
        ValueError: ``tensor_parallel_size`` not a positive integer (here), or not dividing the
            world size, or ``data_parallel_size * tensor_parallel_size`` not the world size (at
            ``setup_environment``, when the world size is known).

    Example:
        >>> trainer = L.Trainer(strategy=FSDP2Strategy(tensor_parallel_size=2), devices=4)  # 2 DP x 2 TP
    """

    def __init__(self, data_parallel_size: Any = "auto", tensor_parallel_size: int = 1, **kwargs: Any) -> None:
        if not _is_pos_int(tensor_parallel_size):
            raise ValueError(
                f"FSDP2Strategy(tensor_parallel_size={tensor_parallel_size!r}) is invalid; valid: a positive integer "
                f"dividing the world size (1: no tensor parallelism)"
            )
        if data_parallel_size != "auto" and not _is_pos_int(data_parallel_size):
            raise ValueError(
                f"FSDP2Strategy(data_parallel_size={data_parallel_size!r}) is invalid; valid: 'auto' or a positive "
                f"integer (world size / tensor_parallel_size)"
            )
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)

    @property
    def tensor_parallel_size(self) -> int:
        """Ranks per tensor-parallel group (1: none)."""
        return int(self._tensor_parallel_size)

    def check_world_size(self, world_size: int) -> None:
        """Raise ``ValueError`` unless the data- and tensor-parallel sizes tile ``world_size``."""
        _check_parallel_sizes(world_size, self._data_parallel_size, self.tensor_parallel_size)

    @override
    def setup_environment(self) -> None:
        self.check_world_size(self.world_size)
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.world_size // self.tensor_parallel_size
        super().setup_environment()


def _check_parallel_sizes(world_size: int, data_parallel_size: Any, tensor_parallel_size: int) -> None:
    """Raise ``ValueError`` unless the sizes tile ``world_size`` (``data_parallel_size``: int or ``"auto"``)."""
    if world_size % tensor_parallel_size != 0:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"FSDP2Strategy(tensor_parallel_size={tensor_parallel_size}) is invalid for a world size of "
            f"{world_size}; valid: a divisor of the world size, one of {divisors}"
        )
    if data_parallel_size != "auto" and data_parallel_size * tensor_parallel_size != world_size:
        raise ValueError(
            f"FSDP2Strategy(data_parallel_size={data_parallel_size}) is invalid with tensor_parallel_size="
            f"{tensor_parallel_size} and a world size of {world_size}; valid: 'auto' or "
            f"{world_size // tensor_parallel_size} (world size / tensor_parallel_size)"
        )


def check_tensor_parallel(config: LlamaConfig, tp_size: int) -> None:
    """Raise ``ValueError`` unless a Llama of ``config`` can be split over ``tp_size`` ranks.

    Every rank must hold whole attention heads (``n_heads`` and ``n_kv_heads`` divisible by
    ``tp_size``), and the projections must be unfused (a column shard of the fused ``wqkv`` would
    give rank 0 only query rows).
    """
    if not _is_pos_int(tp_size):
        raise ValueError(f"tensor-parallel size {tp_size!r} is invalid; valid: a positive integer")
    if tp_size == 1:
        return
    for name in ("n_heads", "n_kv_heads"):
        value = getattr(config, name)
        if value % tp_size != 0:
            raise ValueError(
                f"LlamaConfig.{name}={value} is invalid with tensor-parallel size {tp_size}; valid: a multiple of "
                f"{tp_size} (each rank holds {name} / {tp_size} whole heads), or a tensor-parallel size dividing {value}"
            )
    if config.fuse_projections:
        raise ValueError(
            f"LlamaConfig.fuse_projections=True is invalid with tensor-parallel size {tp_size}; valid: False (a "
            f"contiguous row shard of the fused wqkv / w13 would not hold each rank's q, k, v or gate, up rows)"
        )


def _style(module: nn.Module, colwise: bool) -> ParallelStyle:
    # the fp8 styles keep a Float8Linear's scaling buffers plain tensors; a layer the filter left
    # in high precision gets PyTorch's own style
    if isinstance(module, Float8Linear):
        return Float8ColwiseParallel() if colwise else Float8RowwiseParallel()
    return ColwiseParallel() if colwise else RowwiseParallel()


def apply_tensor_parallel(model: Llama, tp_mesh: DeviceMesh) -> None:
    """Megatron-style tensor parallelism for every transformer block, in place.

    Per block, on the ``tp`` ranks of ``tp_mesh``::

        attention.wq, wk, wv     colwise  weight Shard(0)   x [B, T, D] replicated -> local heads [B, T, H/tp * Dh]
        attention.wo             rowwise  weight Shard(1)   [B, T, H/tp * Dh] -> all-reduce -> [B, T, D]
        feed_forward.w1, w3      colwise  weight Shard(0)   -> [B, T, F/tp]
        feed_forward.w2          rowwise  weight Shard(1)   -> all-reduce -> [B, T, D]

    so attention runs on this rank's ``H/tp`` query and ``Hkv/tp`` key/value heads and SwiGLU on
    its ``F/tp`` hidden units; two all-reduces per block in forward, two in backward (high
    precision). ``Float8Linear`` layers get the fp8 styles of :mod:`fp8train.tp` (shard-local fp8
    GEMMs), ``nn.Linear`` layers PyTorch's. Norms, embeddings and ``lm_head`` stay replicated
    (every TP rank computes them on the same data). No sequence parallelism.

    Apply after the fp8 conversion and before ``torch.compile`` and ``fully_shard``; works on a
    model on the meta device.

    Args:
        model: a :class:`Llama` (possibly converted to fp8) with unfused projections.
        tp_mesh: a 1-D device mesh, e.g. ``mesh["tensor_parallel"]``.

    Raises:
        ValueError: ``tp_mesh`` not 1-D, or a model that cannot be split (see
            :func:`check_tensor_parallel`).

    Example:
        >>> tp_mesh = init_device_mesh("cuda", (2,))
        >>> convert_to_float8_training(model, config="tensorwise")
        >>> apply_tensor_parallel(model, tp_mesh)
    """
    if tp_mesh.ndim != 1:
        raise ValueError(
            f"apply_tensor_parallel(tp_mesh={tp_mesh}) is invalid; valid: a 1-D mesh (e.g. mesh['tensor_parallel'])"
        )
    check_tensor_parallel(model.config, tp_mesh.size())
    if tp_mesh.size() == 1:
        return
    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        plan = {f"attention.{n}": _style(getattr(attn, n), True) for n in ("wq", "wk", "wv")}
        plan["attention.wo"] = _style(attn.wo, False)
        plan.update({f"feed_forward.{n}": _style(getattr(ffn, n), True) for n in ("w1", "w3")})
        plan["feed_forward.w2"] = _style(ffn.w2, False)
        parallelize_module(block, tp_mesh, plan)


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
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) for gradients on several device meshes.

    Under TP x FSDP the block weights are DTensors on the 2-D mesh and the replicated parameters
    (norms, embeddings, ``lm_head``) on its ``data_parallel`` dim only; torch's version stacks
    their norms and DTensor refuses to mix meshes. Here each mesh's gradients get their own global
    norm (``full_tensor``: one all-reduce per mesh), and the norms are combined as plain tensors.

    Returns:
        The total norm before clipping, a 0-dim plain tensor.
    """
    by_mesh: dict[Any, list[nn.Parameter]] = {}
    for p in parameters:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = []
    for params in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack(norms))
    for params in by_mesh.values():  # one foreach per mesh: DTensor's foreach ops refuse mixed meshes
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a model built on the meta device (only this rank's shards) and initialise it.

    Weights get ``Llama.init_weights``; delayed-scaling buffers are registered afresh (zeros, scale
    1), as a freshly converted layer has them. On CPU the sharded weights are cut from a whole
    model initialised in this process (see :func:`_init_as_unsharded`).
    """
    if not any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        return
    model.to_empty(device=device)
    for m in model.modules():
        if isinstance(m, Float8Linear) and m.config.has_delayed:
            register_delayed_buffers(m, m.config, device)
    if isinstance(model, Llama):
        if device.type == "cpu" and any(isinstance(p, DTensor) for p in model.parameters()):
            _init_as_unsharded(model)
        else:
            model.init_weights()


@torch.no_grad()
def _init_as_unsharded(model: Llama) -> None:
    """Initialise ``model``'s DTensor parameters with this rank's shards of an unsharded init.

    DTensor's random ops have no distributed generator on CPU: ``init_weights`` on shards would
    draw every rank's shard from the same generator state, giving all shards of a weight the same
    values, and a different model for each sharding. Drawing the whole model and keeping the
    local pieces gives the same weights for any data- or tensor-parallel layout. Costs one
    unsharded copy of the model in host memory (CPU runs are tests and small models).
    """
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.reset_parameters()
    with torch.device("meta"):
        full = Llama(model.config)
    full.to_empty(device="cpu")
    full.init_weights()
    whole = dict(full.named_parameters())
    for name, p in model.named_parameters():
        src = whole[name]
        if isinstance(p, DTensor):
            # Replicate -> the parameter's placements is a local slice, no communication
            replicated = DTensor.from_local(src, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)
            p.to_local().copy_(replicated.redistribute(placements=p.placements).to_local())
        else:
            p.copy_(src)

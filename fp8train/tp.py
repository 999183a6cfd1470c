"""Tensor parallelism for ``Float8Linear`` over DTensor: shard-local fp8 GEMMs and fp8 TP styles.

A ``Float8Linear`` whose weight is a DTensor (``parallelize_module`` with PyTorch's
``ColwiseParallel``/``RowwiseParallel`` or the fp8 styles below) runs its three GEMMs on this
rank's shards, then hands the output back as a DTensor (``sharded_forward``)::

    colwise  weight Shard(0) [N/tp, K]   input Replicate [M, K]     -> output Shard(-1) [M, N/tp]
    rowwise  weight Shard(1) [N, K/tp]   input Shard(-1) [M, K/tp]  -> output Partial   [M, N]

so the communication is exactly that of a high-precision TP linear (the style's input/output
redistributions), with no collective for the casts. Scales:

* dynamic scaling: each rank scales its own shard of weight, activation and gradient (at least as
  fine as one scale for the whole tensor; results match a single process within fp8 rounding,
  not bit for bit);
* delayed scaling: each rank records its shard's amax and ``sync_float8_amax_and_scale_history``
  all-reduces MAX over the world, so every rank casts with the scale of the whole tensor, the
  one a single process would use.

``Float8ColwiseParallel`` / ``Float8RowwiseParallel`` are the PyTorch styles plus: the layer's
fp8 scaling buffers stay plain replicated tensors (PyTorch's styles turn every buffer into a
DTensor), and with a sequence-parallel input (``input_layouts=Shard(1)``) the colwise input is
cast to fp8 on its shard and all-gathered as fp8 bytes (uint8: gloo has no fp8 collectives),
half the bytes of bf16. That cast needs one scale on all TP ranks: delayed scaling's stored
scale, or (dynamic) a MAX all-reduce of one scalar. What stays in high precision on the wire:
the rowwise output's all-reduce / reduce-scatter (a sum), the colwise input's gradient
reduce-scatter, and the all-gather of the rowwise output's gradient under sequence parallelism.

Order (torchtitan's): convert to fp8 -> ``parallelize_module`` -> activation checkpointing ->
``torch.compile`` -> ``fully_shard`` over the data-parallel mesh dimension (2-D: TP x FSDP).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from fp8train.config import Float8LinearConfig, GemmInputRole, ScalingType
from fp8train.delayed import record_amax
from fp8train.scaling import amax_to_scale, saturated_cast, tensor_amax
from fp8train.tensor import Float8Tensor

__all__ = ["Float8ColwiseParallel", "Float8RowwiseParallel", "sharded_forward", "localize_fp8_buffers"]

LocalForward = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _is_shard(p: Placement, dim: int, ndim: int) -> bool:
    return isinstance(p, Shard) and p.dim % ndim == dim % ndim


def sharded_forward(module: nn.Module, input: torch.Tensor, forward: LocalForward) -> torch.Tensor:
    """Run ``forward(x_local, weight_local, None)`` on this rank's shards; add the bias as a DTensor.

    Args:
        module: a linear layer whose ``weight`` is a DTensor on a 1-D (tensor-parallel) mesh.
        input: a DTensor (redistributed to what the weight's sharding needs), or a plain tensor
            taken as this rank's local input (replicated for colwise, last-dim shard for rowwise).
        forward: the layer's forward on local tensors.

    Returns:
        A DTensor: ``Shard(-1)`` for a colwise (``Shard(0)``) weight, ``Partial()`` for a rowwise
        (``Shard(1)``) one, the input's placement for a replicated one.

    Raises:
        NotImplementedError: a weight on a mesh of more than one dimension at forward time, or
            sharded along another dim.
    """
    weight: DTensor = module.weight  # type: ignore[assignment]
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(
            f"Float8Linear: weight on a {mesh.ndim}-D mesh {mesh} at forward time; tensor parallelism expects the "
            f"1-D TP mesh (under FSDP2 the data-parallel dimension is all-gathered before forward)"
        )
    (wp,) = weight.placements
    out_ndim = input.dim()
    # need: the input's placement; grad: its gradient's (a column shard of the weight gives a
    # partial sum of the replicated input's gradient); out_p: the output's
    if _is_shard(wp, 0, 2):
        need, grad, out_p = Replicate(), Partial(), Shard(out_ndim - 1)
    elif _is_shard(wp, 1, 2):
        need = grad = Shard(out_ndim - 1)
        out_p = Partial()
    elif wp.is_replicate():
        need = input.placements[0] if isinstance(input, DTensor) else Replicate()
        if _is_shard(need, -1, out_ndim):
            need = Replicate()
        grad = out_p = need
    else:
        raise NotImplementedError(f"Float8Linear: weight placement {wp} is not supported under tensor parallelism")
    x = input
    if isinstance(x, DTensor):
        if x.device_mesh != mesh:
            raise NotImplementedError(f"Float8Linear: input on mesh {x.device_mesh}, weight on {mesh}")
        if not (x.placements[0] == need or (isinstance(need, Shard) and _is_shard(x.placements[0], need.dim, out_ndim))):
            x = x.redistribute(placements=[need])
        x = x.to_local(grad_placements=[grad])
    localize_fp8_buffers(module)
    out = forward(x, weight.to_local(), None)
    # the global shape, given rather than inferred (a TP shard of N may be uneven): the input's
    # leading dims (global for a DTensor input) and the weight's N
    shape = torch.Size((*input.shape[:-1], weight.shape[0]))
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    out = DTensor.from_local(out, mesh, [out_p], run_check=False, shape=shape, stride=tuple(strides))
    bias = getattr(module, "bias", None)
    # DTensor adds the bias: colwise shard to shard; to a Partial output (rowwise) after reducing it
    return out if bias is None else out + bias


def localize_fp8_buffers(module: nn.Module) -> None:
    """Replace DTensor ``fp8_*`` buffers (PyTorch's TP styles replicate every buffer) by their local
    tensors: scaling state is per layer and kept identical on all ranks by the delayed sync."""
    for name, buf in list(module._buffers.items()):
        if name.startswith("fp8_") and isinstance(buf, DTensor):
            module._buffers[name] = buf.to_local().detach()


def _fp8_input_config(module: nn.Module) -> Float8LinearConfig | None:
    """The layer's config when its input cast can happen before an all-gather (tensorwise fp8)."""
    config = getattr(module, "config", None)
    if not isinstance(config, Float8LinearConfig) or not getattr(module, "fp8_enabled", False):
        return None
    cast = config.cast_config_input
    return config if cast.enabled and not (cast.axiswise or cast.mx) else None


class _AllGatherFloat8(torch.autograd.Function):
    """Forward: cast the local shard to fp8 and all-gather the bytes along ``dim`` -> Float8Tensor.
    Backward: reduce-scatter (sum) the high-precision gradient back to the shard."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, dim: int, group: Any, mm_config: Any
    ) -> Float8Tensor:
        ctx.dim, ctx.group = dim, group
        data = saturated_cast(x, scale, dtype).view(torch.uint8).contiguous()
        gathered = funcol.wait_tensor(funcol.all_gather_tensor(data, dim, group))
        return Float8Tensor(gathered.view(dtype), scale, x.dtype, mm_config, GemmInputRole.INPUT)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if isinstance(grad, Float8Tensor):
            grad = grad.dequantize()
        shard = funcol.wait_tensor(funcol.reduce_scatter_tensor(grad.contiguous(), "sum", ctx.dim, ctx.group))
        return shard, None, None, None, None, None


@torch.no_grad()
def _input_scale(module: nn.Module, x: torch.Tensor, config: Float8LinearConfig, group: Any) -> torch.Tensor:
    """One scale for the whole (gathered) input, the same on every TP rank."""
    cast = config.cast_config_input
    if cast.scaling_type is ScalingType.DELAYED:
        if module.training:
            record_amax(module.fp8_amax_input, x)
        if module.is_amax_initialized:
            return module.fp8_scale_input.clone()
    amax = funcol.wait_tensor(funcol.all_reduce(tensor_amax(x), "max", group))
    return amax_to_scale(amax, cast.target_dtype, config.round_scales_to_power_of_2)


class Float8ColwiseParallel(ColwiseParallel):
    """``ColwiseParallel`` for ``Float8Linear``; a sequence-parallel input is all-gathered in fp8.

    Same arguments as ``ColwiseParallel``. With ``input_layouts=Shard(d)`` and a tensorwise fp8
    input cast, the input is cast on its shard (scale shared by the TP group) and all-gathered as
    fp8 bytes; the layer then skips its own input cast. Otherwise it behaves like
    ``ColwiseParallel``. Plain ``nn.Linear`` layers are parallelized as by ``ColwiseParallel``.

    Example:
        >>> parallelize_module(block, tp_mesh, {
        ...     "w1": Float8ColwiseParallel(input_layouts=Shard(1)),        # sequence parallel
        ...     "w2": Float8RowwiseParallel(output_layouts=Shard(1)),
        ... })
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        out = super()._apply(module, device_mesh)
        localize_fp8_buffers(module)
        return out

    @staticmethod
    def _prepare_input_fn(
        input_layouts: tuple[Placement, ...], desired_input_layouts: tuple[Placement, ...], mod: nn.Module,
        inputs: Any, device_mesh: DeviceMesh,
    ) -> Any:
        x = inputs[0]
        config = _fp8_input_config(mod)
        layout = input_layouts[0]
        if config is None or not isinstance(layout, Shard) or isinstance(x, DTensor) or device_mesh.ndim != 1:
            return ColwiseParallel._prepare_input_fn(input_layouts, desired_input_layouts, mod, inputs, device_mesh)
        group = device_mesh.get_group()
        scale = _input_scale(mod, x, config, group)
        dim = layout.dim % x.dim()
        return _AllGatherFloat8.apply(x, scale, config.cast_config_input.target_dtype, dim, group,
                                      mod.linear_mm_config)


class Float8RowwiseParallel(RowwiseParallel):
    """``RowwiseParallel`` for ``Float8Linear`` (its fp8 scaling buffers stay plain tensors).

    Same arguments as ``RowwiseParallel``; the output's reduction (all-reduce, or reduce-scatter
    with ``output_layouts=Shard(1)``) runs in high precision.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        out = super()._apply(module, device_mesh)
        localize_fp8_buffers(module)
        return out


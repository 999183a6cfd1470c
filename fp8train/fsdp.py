"""FSDP2 with fp8 all-gather: the weight wrapper and the fused scale precompute.

With ``Float8LinearConfig(enable_fsdp_float8_all_gather=True)`` each ``Float8Linear`` weight is a
``Float8AllGatherWeight``: a tensor subclass around the high-precision weight (the optimizer, the
checkpoint and every op see that tensor) that implements FSDP2's all-gather extension, so the
weight travels in fp8::

    fsdp_pre_all_gather    this rank's shard [N/world, K] (high precision) -> fp8 bytes + the scale
    all-gather             uint8 [world * N/world * K]: half the bytes of bf16, a quarter of fp32
    fsdp_post_all_gather   -> Float8Tensor(whole weight [N, K], scale), which Float8Linear's
                              output and grad_input GEMMs use as it is (no cast in forward)

Weight gradients flow to the sharded high-precision parameter as usual (FSDP2 reduce-scatters
them in high precision). The gathered bytes share one tensorwise scale, identical on every rank:

* dynamic scaling: ``fp8_max / amax(whole weight)``. ``precompute_float8_dynamic_scale_for_fsdp``
  computes it for every layer in one fused step after the optimizer step (one ``_foreach_norm`` of
  the local shards, one MAX all-reduce per mesh dimension). A layer whose weight changed since
  (an optimizer step, an in-place edit, ``load_state_dict``, or no precompute at all: ``_stamp``)
  computes its amax with its own
  all-reduce in pre-all-gather: correct, only slower. The scale is the same as without fp8 all-gather (amax is exact), so
  losses are bit-identical with and without it. The precompute also casts every shard (one
  ``cast_kernel.cast_group`` launch on a GPU), and the step's all-gathers send those bytes: no
  cast on FSDP2's all-gather path (``docs/PERF_NOTES.md`` entry 23).
* delayed scaling: the layer's ``fp8_scale_weight``; the shard's amax is recorded into
  ``fp8_amax_weight`` and the sync's MAX all-reduce makes it the whole weight's. Before the first
  sync, the dynamic scale above.

FSDP2 gathers a resharded weight again in backward: that all-gather reuses the forward's fp8 bytes
(kept in between, in training mode; FSDP2 all-gathers under ``no_grad``, so grad mode says nothing)
when no optimizer step or in-place edit came between. On a GPU the shard is cast
by ``fp8train.cast_kernel`` (cast + amax from one read) unless ``cast_kernel="torch"``; with delayed
scaling one launch also folds the amax into the buffer and copies the stored scale (FSDP2 runs
pre-all-gathers on the thread that issues the step, so each launch costs step time:
``docs/PERF_NOTES.md`` entry 22).

Why uint8 on the wire: gloo has no fp8 collectives, and FSDP2 itself all-gathers in uint8 when a
group mixes dtypes; the bytes are the same.

``state_dict()`` holds plain tensors (or DTensors of plain tensors); loading copies into the
wrapped weight in place. Not supported: ``reshard_after_forward=<int>`` (FSDP2 has no extension
path for a smaller post-forward mesh), axiswise weight casts (rejected by the config). A recipe
whose grad_input GEMM casts the weight differently (``cast_config_weight_for_grad_input``) re-casts
it from the gathered fp8 copy: the weight is rounded twice for that GEMM.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._pytree import tree_map_only

from fp8train import cast_kernel
from fp8train.config import Float8LinearConfig, GemmInputRole, ScalingType
from fp8train.delayed import record_amax
from fp8train.scaling import amax_to_scale, saturated_cast, tensor_amax
from fp8train.tensor import Float8Tensor

__all__ = ["Float8AllGatherWeight", "enable_float8_all_gather", "precompute_float8_dynamic_scale_for_fsdp"]

aten = torch.ops.aten

# Ops whose result is (a view or a copy of) the same weight: the result stays wrapped, so the
# wrapper survives nn.Module._apply (.to, .to_empty), FSDP2's sharding and padding, TP's
# distribute_tensor, and Parameter creation. Everything else returns plain tensors; zeros_like is
# left out so that optimizer states (Adam's exp_avg, ...) are plain tensors.
_KEEP_WRAPPED = {
    aten.detach.default, aten.alias.default, aten.view.default, aten._unsafe_view.default,
    aten.as_strided.default, aten.slice.Tensor, aten.narrow.default, aten.split.Tensor,
    aten.split_with_sizes.default, aten.chunk.default, aten.clone.default, aten.contiguous.default,
    aten._to_copy.default, aten.empty_like.default, aten.new_zeros.default,
    aten.new_empty.default, aten.new_empty_strided.default, aten._pin_memory.default,
}


class Float8AllGatherWeight(torch.Tensor):
    """A high-precision weight that FSDP2 all-gathers in fp8 (see the module docstring).

    Behaves as the tensor it wraps (same shape, dtype, device; every op runs on it) except that
    FSDP2 finds ``fsdp_pre_all_gather``/``fsdp_post_all_gather`` on it. It holds no fp8 settings:
    those come from the ``Float8Linear`` that FSDP2 passes to ``fsdp_pre_all_gather``.

    Args:
        tensor: the high-precision weight (``[out_features, in_features]``, or a shard of it).
    """

    _tensor: torch.Tensor
    _precomputed_scale: torch.Tensor | None
    _precomputed_at: tuple[int, ...]  # _stamp() when it was computed
    _forward_cast: tuple[tuple[int, int], Any] | None  # ((optimizer steps, weight version), pre-all-gather result)
    _precast: tuple[tuple[int, int], Any] | None  # the same, cast by precompute_float8_dynamic_scale_for_fsdp

    @staticmethod
    def __new__(cls, tensor: torch.Tensor) -> "Float8AllGatherWeight":
        self = torch.Tensor._make_wrapper_subclass(
            cls,
            tensor.size(),
            strides=tensor.stride(),
            storage_offset=tensor.storage_offset(),
            dtype=tensor.dtype,
            layout=tensor.layout,
            device=tensor.device,
            requires_grad=tensor.requires_grad,
        )
        self._tensor = tensor
        _STEPS.watch()
        self._precomputed_scale = None
        self._precomputed_at = ()
        self._forward_cast = None
        self._precast = None
        return self

    def __repr__(self) -> str:
        return f"Float8AllGatherWeight({self._tensor})"

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["_tensor"], None

    @staticmethod
    def __tensor_unflatten__(
        inner: dict[str, torch.Tensor], ctx: Any, outer_size: Any, outer_stride: Any
    ) -> "Float8AllGatherWeight":
        return Float8AllGatherWeight(inner["_tensor"])

    def __reduce_ex__(self, protocol: Any) -> Any:
        # pickling (torch.save of a module, deepcopy) stores the wrapped tensor
        return Float8AllGatherWeight, (self._tensor,)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*_unwrap(args), **{k: _unwrap(v) for k, v in (kwargs or {}).items()})
        schema_args = func._schema.arguments
        if schema_args and schema_args[0].alias_info is not None and schema_args[0].alias_info.is_write:
            # in place (copy_, add_, the optimizer's foreach updates): the wrapper itself, or nothing
            return args[0] if func._schema.returns else None
        if func in _KEEP_WRAPPED:
            return tree_map_only(torch.Tensor, cls, out)
        return out

    # --- FSDP2 all-gather extension (the 5-argument pre-all-gather of torch 2.5+, checked in 2.13 and main) ---
    @property
    def fsdp_pre_all_gather(self) -> "_PreAllGather":
        """FSDP2's pre-all-gather hook: ``weight.fsdp_pre_all_gather(mesh, outer_size, outer_stride,
        module, mp_policy)`` runs ``_pre_all_gather``. A callable object, not a method: FSDP2 calls
        ``inspect.signature`` on it at every all-gather of every weight, which rebuilds a bound
        method's signature each time (40-125 us on a CPU); this object carries it ready-made."""
        return _PreAllGather(self)

    def _pre_all_gather(
        self, mesh: Any, outer_size: torch.Size, outer_stride: tuple[int, ...], module: nn.Module, mp_policy: Any
    ) -> tuple[tuple[torch.Tensor, ...], Any]:
        """This rank's shard cast to fp8 with the whole weight's scale, as uint8 bytes padded to
        FSDP2's padded shard size; metadata: ``(scale, fp8 dtype, linear_mm_config)``.

        FSDP2 gathers a resharded weight twice per step, in forward and again in backward. The
        backward all-gather reuses the bytes the forward cast (kept until then: one byte per
        element of the shard) when no optimizer step and no in-place edit of the weight came
        between; any other call casts afresh. After ``precompute_float8_dynamic_scale_for_fsdp``,
        both take the bytes it cast (``_precast``)."""
        now = _stamp(self, module)
        rows = -(-outer_size[0] // mesh.size())  # FSDP2 pads every shard to the first one's rows
        if self._precast is not None:
            if self._precast[0] == now:
                (data,), metadata = self._precast[1]
                if data.is_cuda:  # allocated on the compute stream, read by FSDP2's copy-in stream
                    data.record_stream(torch.cuda.current_stream(data.device))
                return (_pad_rows(data, rows),), metadata
            self._precast = None  # stale: the weight changed since the precompute
        in_backward = torch._C._current_graph_task_id() != -1
        if in_backward and self._forward_cast is not None:
            cached_at, result = self._forward_cast
            self._forward_cast = None
            if cached_at == now:
                return result
        config: Float8LinearConfig = module.config
        cast = config.cast_config_weight
        scale, stored = _weight_scale(self, mesh, module)
        record = cast.scaling_type is ScalingType.DELAYED and module.training
        data, scale = _cast_shard(self._tensor, scale, cast.target_dtype, module.fp8_amax_weight if record else None,
                                  config.cast_kernel, stored)
        result = (_pad_rows(data.view(torch.uint8), rows),), (scale, cast.target_dtype, module.linear_mm_config)
        # keep a forward's bytes for the backward all-gather (training mode only: eval has no backward).
        # Not keyed on grad mode: FSDP2 all-gathers under no_grad, so that would never keep anything
        keep = not in_backward and module.training
        self._forward_cast = (now, result) if keep else None
        return result

    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[torch.Tensor, ...],
        metadata: Any,
        param_dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> tuple[Float8Tensor, tuple[torch.Tensor, ...]] | None:
        """The gathered bytes as a Float8Tensor standing for a ``param_dtype`` weight."""
        (data,) = all_gather_outputs
        scale, dtype, mm_config = metadata
        data = data.view(dtype)
        if out is not None:
            # later all-gathers reuse the same output buffer (``out``'s data views it): only the
            # scale is new. ``out`` is a DTensor on the TP mesh for 2-D (TP x FSDP) parameters.
            local = _local(out)
            if not isinstance(local, Float8Tensor):
                raise TypeError(
                    f"fsdp_post_all_gather: expected the Float8Tensor of the first all-gather, got {type(local)}"
                )
            local._scale = scale
            return None
        return Float8Tensor(data, scale, param_dtype, mm_config, GemmInputRole.WEIGHT), (data,)


def _pad_rows(data: torch.Tensor, rows: int) -> torch.Tensor:
    return F.pad(data, (0, 0, 0, rows - data.shape[0])) if data.shape[0] < rows else data


def _unwrap(x: Any) -> Any:
    """``x`` with each ``Float8AllGatherWeight`` replaced by the tensor it wraps. aten arguments are
    tensors, scalars and flat lists of them; cheaper than pytree on the fused optimizer's lists."""
    if isinstance(x, Float8AllGatherWeight):
        return x._tensor
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    return x


class _PreAllGather:
    """``Float8AllGatherWeight.fsdp_pre_all_gather`` bound to one weight, with a stored signature."""

    __slots__ = ("weight",)

    def __init__(self, weight: Float8AllGatherWeight) -> None:
        self.weight = weight

    def __call__(
        self, mesh: Any, outer_size: torch.Size, outer_stride: tuple[int, ...], module: nn.Module, mp_policy: Any
    ) -> tuple[tuple[torch.Tensor, ...], Any]:
        return self.weight._pre_all_gather(mesh, outer_size, outer_stride, module, mp_policy)


_signature = inspect.signature(_PreAllGather.__call__)
_PreAllGather.__signature__ = _signature.replace(  # type: ignore[attr-defined]
    parameters=list(_signature.parameters.values())[1:]  # what FSDP2 counts: 5 parameters, no self
)
del _signature


class _StepCounter:
    """Optimizer steps taken in this process (a global ``torch.optim`` post-step hook, registered
    when the first ``Float8AllGatherWeight`` is made). A precomputed scale is used only while
    neither this count nor the weight's version counter moved: a forgotten precompute costs
    speed, never a stale scale. (Both are checked: foreach in-place ops on wrapper subclasses do
    not always bump the version counter.)"""

    def __init__(self) -> None:
        self.count = 0
        self._handle: Any = None

    def watch(self) -> None:
        if self._handle is None:
            self._handle = register_optimizer_step_post_hook(self._step)

    def _step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.count += 1


_STEPS = _StepCounter()


def _stamp(weight: Float8AllGatherWeight, module: nn.Module) -> tuple[int, ...]:
    """What a precomputed scale or cast of ``weight`` is valid for: the optimizer steps taken and the
    version counters of the wrapper, the tensor it wraps and the module's parameter (under FSDP2 a
    DTensor around the wrapper: an in-place edit or ``load_state_dict`` through it bumps only its
    own counter). Writes through ``.data`` bump none; ``load_state_dict`` also drops the caches
    (``_drop_caches``)."""
    param = getattr(module, "weight", None)
    return _STEPS.count, weight._version, weight._tensor._version, -1 if param is None else param._version


def _drop_caches(module: nn.Module, incompatible_keys: Any = None) -> None:
    """Forget precomputed scales and fp8 bytes of ``module``'s weight (a load_state_dict post-hook:
    a raw ``torch.distributed.checkpoint.load`` into the state dict's tensors bumps no counter)."""
    local = _local(module.weight)
    if isinstance(local, Float8AllGatherWeight):
        local._precomputed_scale, local._precomputed_at = None, ()
        local._precast = local._forward_cast = None


@torch.no_grad()
def _weight_scale(weight: Float8AllGatherWeight, mesh: Any, module: nn.Module) -> tuple[torch.Tensor, bool]:
    """The whole weight's scale for this all-gather, and whether it is the layer's stored
    (delayed-scaling) buffer, which the sync rewrites in place: the caller must copy that one."""
    config: Float8LinearConfig = module.config
    cast = config.cast_config_weight
    shard = weight._tensor
    if cast.scaling_type is ScalingType.DELAYED:
        if module.is_amax_initialized:
            return module.fp8_scale_weight, True
    elif weight._precomputed_scale is not None and weight._precomputed_at == _stamp(weight, module):
        return weight._precomputed_scale, False
    amax = tensor_amax(shard) if shard.numel() else torch.zeros((), device=shard.device)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
    return amax_to_scale(amax, cast.target_dtype, config.round_scales_to_power_of_2), False


@torch.no_grad()
def _cast_shard(
    shard: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, amax: torch.Tensor | None, kernel: str,
    stored: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(saturated_cast(shard, scale, dtype), scale used)``, recording the shard's amax into
    ``amax`` (delayed scaling) when given. ``stored``: ``scale`` is the layer's scale buffer, which
    the delayed-scaling sync rewrites in place, so a copy is returned.

    FSDP2 runs this outside compiled code, on its all-gather path, where torch ops would take four
    passes through fp32 temporaries plus launches for the amax and the copy; the Triton kernel
    (``cast_kernel`` ``"auto"``/``"triton"`` where it runs) does it in one launch and one read of the
    shard, with the same bytes."""
    if kernel != "torch" and shard.numel() and cast_kernel.fits(shard, dtype):
        both = (scale,) if amax is None else (scale, amax)
        if (stored or amax is not None) and cast_kernel.launches_directly(shard, *both):
            return cast_kernel.cast_with_stored_scale(shard, scale, dtype, amax)
        # elsewhere (a buffer still a DTensor before TP localizes it, or something tracing): the op
        data, _, seen = cast_kernel.cast_transpose(shard, scale, dtype, row_major=True, transposed=False,
                                                   amax=amax is not None)
        if amax is not None:
            amax.copy_(torch.maximum(amax, seen))
        return data, scale.clone() if stored else scale
    if amax is not None and shard.numel():  # an empty shard (fewer rows than ranks) has nothing to record
        record_amax(amax, shard)
    return saturated_cast(shard, scale, dtype), scale.clone() if stored else scale


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _unwrap_for_state_dict(t: torch.Tensor) -> torch.Tensor:
    local = _local(t)
    if not isinstance(local, Float8AllGatherWeight):
        return t
    if isinstance(t, DTensor):  # a view of the same storage: DCP loads into it in place
        return DTensor.from_local(local._tensor, t.device_mesh, t.placements, run_check=False,
                                  shape=t.shape, stride=t.stride())
    return local._tensor


def _plain_state_dict_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    key = prefix + "weight"
    if isinstance(state_dict.get(key), torch.Tensor):
        state_dict[key] = _unwrap_for_state_dict(state_dict[key])


def enable_float8_all_gather(module: nn.Module) -> None:
    """Wrap ``module.weight`` in a ``Float8AllGatherWeight`` (idempotent).

    ``Float8Linear`` calls this when its config has ``enable_fsdp_float8_all_gather=True``; the
    weight becomes a new ``nn.Parameter`` object, so build optimizers after conversion (as after
    ``fully_shard`` anyway). Call before ``fully_shard`` / ``parallelize_module``.

    Raises:
        ValueError: the weight is already a DTensor (sharded before conversion).
    """
    weight = module.weight
    if isinstance(_local(weight), Float8AllGatherWeight):
        return
    if isinstance(weight, DTensor):
        raise ValueError(
            f"enable_fsdp_float8_all_gather: {type(module).__name__}.weight is already a DTensor; convert to "
            f"fp8 before fully_shard / parallelize_module (order: convert -> tensor parallel -> compile -> FSDP)"
        )
    module.weight = nn.Parameter(Float8AllGatherWeight(weight.data), requires_grad=weight.requires_grad)
    if not getattr(module, "_fp8train_plain_state_dict", False):
        module.register_state_dict_post_hook(_plain_state_dict_hook)
        module.register_load_state_dict_post_hook(_drop_caches)
        module._fp8train_plain_state_dict = True


_INDEX: dict[tuple[Any, ...], torch.Tensor] = {}


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    # cached: torch.tensor(list, device="cuda") copies from pageable memory, a host-GPU sync
    key = (tuple(rows), device)
    if key not in _INDEX:
        _INDEX[key] = torch.tensor(rows, dtype=torch.long, device=device)
    return _INDEX[key]


@torch.no_grad()
def precompute_float8_dynamic_scale_for_fsdp(model: nn.Module) -> int:
    """Compute the fp8 all-gather scale of every dynamically scaled, FSDP2-sharded weight at once.

    Call after each ``optimizer.step()`` (the Lightning callback does) when layers use
    ``enable_fsdp_float8_all_gather=True`` with dynamic weight scaling. One ``_foreach_norm`` over
    the local shards, one MAX all-reduce per dimension of the weights' device mesh, one vectorised
    scale computation: a fixed number of kernels whatever the layer count, and no host sync. The
    next all-gathers of each weight use the result; a weight modified after this call falls back
    to computing its own scale.

    Args:
        model: any module; its layers with ``Float8AllGatherWeight`` weights sharded by FSDP2
            (DTensor parameters) are updated, the others ignored.

    Returns:
        The number of weights updated.

    Example:
        >>> loss.backward(); optimizer.step()
        >>> fp8train.precompute_float8_dynamic_scale_for_fsdp(model)
    """
    by_mesh: dict[Any, list[nn.Module]] = defaultdict(list)
    for m in model.modules():
        config = getattr(m, "config", None)
        weight = getattr(m, "weight", None)
        if (
            isinstance(config, Float8LinearConfig)
            and isinstance(weight, DTensor)
            and isinstance(weight._local_tensor, Float8AllGatherWeight)
            and config.cast_config_weight.scaling_type is ScalingType.DYNAMIC
        ):
            by_mesh[weight.device_mesh].append(m)
    n = 0
    for mesh, layers in by_mesh.items():
        wrappers = [m.weight._local_tensor for m in layers]
        shards = [w._tensor for w in wrappers]
        # _foreach_norm rejects empty tensors, and uneven FSDP2 shards can leave a rank with none:
        # those contribute 0 to the MAX all-reduce (every rank must join it)
        full = [i for i, t in enumerate(shards) if t.numel() > 0]
        amax = torch.zeros(len(shards), dtype=torch.float32, device=shards[0].device)
        if full:
            norms = torch._foreach_norm([shards[i] for i in full], float("inf"))
            if len(full) == len(shards):
                amax = torch.stack(norms).to(torch.float32)
            else:
                amax = amax.index_put((_index(full, amax.device),), torch.stack(norms).to(torch.float32))
        for dim in range(mesh.ndim):
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
        # amax_to_scale on the whole vector (one call per distinct setting, usually one): the same
        # arithmetic as a cast's own scale, so precomputing changes no bit of the result
        keys = [(m.config.cast_config_weight.target_dtype, m.config.round_scales_to_power_of_2) for m in layers]
        distinct = list(dict.fromkeys(keys))
        if len(distinct) == 1:
            scales = amax_to_scale(amax, *distinct[0])
        else:
            scales = torch.empty_like(amax)
            for key in distinct:
                idx = _index([i for i, k in enumerate(keys) if k == key], amax.device)
                scales[idx] = amax_to_scale(amax[idx], *key)
        for w, s in zip(wrappers, scales.unbind(0)):
            w._precomputed_scale = s
            w._precomputed_at = _stamp(w, m)
        _precast(layers, wrappers, scales)
        n += len(layers)
    return n


def _precast(layers: list[nn.Module], wrappers: list[Float8AllGatherWeight], scales: torch.Tensor) -> None:
    """Cast every shard to fp8 with its precomputed scale now, for the next all-gathers (forward and
    backward, every micro-batch) until the next optimizer step: one ``cast_kernel.cast_group``
    launch per (shard dtype, fp8 dtype) instead of one per weight on FSDP2's all-gather path, where
    each cost ~50-100 us of host time (``docs/PERF_NOTES.md``, entry 23). Shards the kernel does not
    take (CPU, ``cast_kernel="torch"``, non-contiguous) are cast one by one here instead."""
    for w in wrappers:
        w._precast = None  # the previous step's bytes go before the new ones are allocated
    groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = defaultdict(list)
    rest = []
    for i, (m, w) in enumerate(zip(layers, wrappers)):
        dtype, shard = m.config.cast_config_weight.target_dtype, w._tensor
        if (m.config.cast_kernel != "torch" and shard.is_contiguous() and cast_kernel.fits(shard, dtype)
                and cast_kernel.launches_directly(shard)):
            groups[(shard.dtype, dtype)].append(i)
        else:
            rest.append(i)
    data = {}
    for (_, dtype), idx in groups.items():
        group_scales = scales if len(idx) == len(layers) else scales[_index(idx, scales.device)]
        data.update(zip(idx, cast_kernel.cast_group([wrappers[i]._tensor for i in idx], group_scales, dtype)))
    for i in rest:
        m = layers[i]
        data[i] = _cast_shard(wrappers[i]._tensor, scales[i], m.config.cast_config_weight.target_dtype, None,
                              m.config.cast_kernel)[0]
    for i, (m, w, s) in enumerate(zip(layers, wrappers, scales.unbind(0))):
        metadata = (s, m.config.cast_config_weight.target_dtype, m.linear_mm_config)
        w._precast = (_stamp(w, m), ((data[i].view(torch.uint8),), metadata))


"""``Float8Tensor``: fp8 data plus the fp32 scale that maps it back to high precision.

``hp ≈ data.float() / scale``. ``scale`` is a 0-dim tensor (tensorwise) or has the operand's shape
with size 1 along the reduced dim (axiswise; e.g. ``[M, 1]`` for a ``[M, K]`` operand reduced
along ``K``). The wrapper reports the original (high-precision) dtype so autograd and modules treat
it like the tensor it stands for.

Only the ops listed in ``_OPS`` run on a Float8Tensor; any other raises naming the op, so a
silent upcast can never happen. ``__tensor_flatten__``/``__tensor_unflatten__`` let
``torch.compile`` trace through it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._pytree import tree_map

from fp8train.config import GemmInputRole, LinearMMConfig

__all__ = ["Float8Tensor", "implements"]

aten = torch.ops.aten
_OPS: dict[Any, Callable[..., Any]] = {}


def implements(ops: list[Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a handler for aten ops on Float8Tensor (the op table is an allowlist)."""

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        for op in ops:
            _OPS[op] = fn
        return fn

    return decorator


class Float8Tensor(torch.Tensor):
    """fp8 data + scale, standing in for a high-precision tensor of ``orig_dtype``.

    Args:
        data: fp8 tensor (``torch.float8_e4m3fn`` or ``torch.float8_e5m2``).
        scale: fp32 multiplier that was applied before the cast (0-dim or axiswise-shaped).
        orig_dtype: dtype the tensor stands for (what GEMM results come out in).
        linear_mm_config: per-GEMM settings used when this tensor meets ``torch.mm``.
        gemm_input_role: which operand of a linear layer this is.
        axiswise_dim: the dim the scale was reduced along, or ``None`` for tensorwise.
    """

    _data: torch.Tensor
    _scale: torch.Tensor
    _orig_dtype: torch.dtype
    _linear_mm_config: LinearMMConfig
    _gemm_input_role: GemmInputRole
    _axiswise_dim: int | None

    @staticmethod
    def __new__(
        cls,
        data: torch.Tensor,
        scale: torch.Tensor,
        orig_dtype: torch.dtype,
        linear_mm_config: LinearMMConfig | None = None,
        gemm_input_role: GemmInputRole = GemmInputRole.INPUT,
        axiswise_dim: int | None = None,
    ) -> "Float8Tensor":
        self = torch.Tensor._make_wrapper_subclass(
            cls,
            data.size(),
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=orig_dtype,
            layout=data.layout,
            device=data.device,
            requires_grad=False,
        )
        self._data = data
        self._scale = scale
        self._orig_dtype = orig_dtype
        self._linear_mm_config = linear_mm_config if linear_mm_config is not None else LinearMMConfig()
        self._gemm_input_role = gemm_input_role
        self._axiswise_dim = axiswise_dim
        return self

    def __repr__(self) -> str:
        return (
            f"Float8Tensor(fp8={self._data.dtype}, scale={self._scale}, orig_dtype={self._orig_dtype}, "
            f"role={self._gemm_input_role.value}, axiswise_dim={self._axiswise_dim}, shape={tuple(self.shape)})"
        )

    def __tensor_flatten__(self) -> tuple[list[str], tuple[Any, ...]]:
        ctx = (self._orig_dtype, self._linear_mm_config, self._gemm_input_role, self._axiswise_dim)
        return ["_data", "_scale"], ctx

    @staticmethod
    def __tensor_unflatten__(
        inner: dict[str, torch.Tensor], ctx: tuple[Any, ...], outer_size: Any, outer_stride: Any
    ) -> "Float8Tensor":
        return Float8Tensor(inner["_data"], inner["_scale"], *ctx)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """High-precision value ``data / scale`` in ``dtype`` (default: ``orig_dtype``). Not differentiable;
        use ``fp8train.scaling.from_float8`` inside autograd."""
        return (self._data.to(torch.float32) / self._scale).to(dtype or self._orig_dtype)

    def with_data(self, data: torch.Tensor, scale: torch.Tensor | None = None, axiswise_dim: Any = "keep") -> "Float8Tensor":
        """Same metadata around new data (and optionally a new scale / axiswise dim)."""
        return Float8Tensor(
            data,
            self._scale if scale is None else scale,
            self._orig_dtype,
            self._linear_mm_config,
            self._gemm_input_role,
            self._axiswise_dim if axiswise_dim == "keep" else axiswise_dim,
        )

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        handler = _OPS.get(func)
        if handler is None:
            raise NotImplementedError(
                f"Float8Tensor does not support {func}. Dequantize first (x.dequantize()) or add a "
                f"handler with fp8train.tensor.implements([{func}])."
            )
        return handler(func, args, kwargs)

    # Float8Tensor is not a "real" tensor for __torch_function__ purposes.
    __torch_function__ = torch._C._disabled_torch_function_impl


# --- op table: layout ops ------------------------------------------------------------------------
def _require_tensorwise(t: Float8Tensor, func: Any) -> None:
    if t._axiswise_dim is not None:
        raise NotImplementedError(f"{func} on an axiswise-scaled Float8Tensor is not supported; dequantize first")


@implements([aten.t.default])
def _t(func: Any, args: Any, kwargs: Any) -> Float8Tensor:
    t: Float8Tensor = args[0]
    scale = t._scale.t() if t._scale.dim() == 2 else t._scale
    dim = None if t._axiswise_dim is None else (1 - (t._axiswise_dim % 2))
    return t.with_data(t._data.t(), scale, dim)


@implements([aten.transpose.int])
def _transpose(func: Any, args: Any, kwargs: Any) -> Float8Tensor:
    t: Float8Tensor = args[0]
    d0, d1 = args[1] % t.dim(), args[2] % t.dim()
    if t._axiswise_dim is None:
        return t.with_data(t._data.transpose(d0, d1))
    ax = t._axiswise_dim % t.dim()
    ax = d1 if ax == d0 else d0 if ax == d1 else ax
    return t.with_data(t._data.transpose(d0, d1), t._scale.transpose(d0, d1), ax)


@implements([aten.view.default, aten.reshape.default, aten._unsafe_view.default])
def _view(func: Any, args: Any, kwargs: Any) -> Float8Tensor:
    t: Float8Tensor = args[0]
    _require_tensorwise(t, func)
    return t.with_data(func(t._data, *args[1:], **kwargs))


@implements([aten.as_strided.default])
def _as_strided(func: Any, args: Any, kwargs: Any) -> Float8Tensor:
    # FSDP2 views the all-gathered fp8 weight as the parameter's shape (fp8train.fsdp)
    t: Float8Tensor = args[0]
    _require_tensorwise(t, func)
    return t.with_data(func(t._data, *args[1:], **kwargs))


@implements([aten.clone.default, aten.detach.default, aten.alias.default, aten.contiguous.default])
def _same_meta(func: Any, args: Any, kwargs: Any) -> Float8Tensor:
    t: Float8Tensor = args[0]
    return t.with_data(func(t._data, *args[1:], **kwargs))


@implements([aten.split.Tensor, aten.chunk.default])
def _split(func: Any, args: Any, kwargs: Any) -> list[Float8Tensor]:
    t: Float8Tensor = args[0]
    _require_tensorwise(t, func)
    return [t.with_data(d) for d in func(t._data, *args[1:], **kwargs)]


@implements([aten.slice.Tensor, aten.select.int, aten.narrow.default])
def _slice(func: Any, args: Any, kwargs: Any) -> Float8Tensor:
    t: Float8Tensor = args[0]
    _require_tensorwise(t, func)
    return t.with_data(func(t._data, *args[1:], **kwargs))


@implements([aten.cat.default])
def _cat(func: Any, args: Any, kwargs: Any) -> Float8Tensor:
    # All pieces must share one tensorwise scale (FSDP2 shards of one weight do); the first piece's
    # scale is used. Comparing scale values would need a host sync, so it is the caller's contract.
    tensors: list[Float8Tensor] = list(args[0])
    for t in tensors:
        if not isinstance(t, Float8Tensor):
            raise NotImplementedError("aten.cat mixes Float8Tensor with plain tensors; cast all pieces first")
        _require_tensorwise(t, func)
    return tensors[0].with_data(func([t._data for t in tensors], *args[1:], **kwargs))


@implements([aten._to_copy.default])
def _to_copy(func: Any, args: Any, kwargs: Any) -> Float8Tensor:
    # Moving devices moves data and scale; a dtype change only changes what the tensor stands for
    # (the result dtype of its GEMMs), the fp8 payload stays.
    t: Float8Tensor = args[0]
    kw = dict(kwargs)
    dtype = kw.pop("dtype", None) or t._orig_dtype
    data = func(t._data, **kw)
    scale = func(t._scale, **kw)
    return Float8Tensor(data, scale, dtype, t._linear_mm_config, t._gemm_input_role, t._axiswise_dim)


@implements([aten.is_same_size.default])
def _is_same_size(func: Any, args: Any, kwargs: Any) -> bool:
    return args[0].shape == args[1].shape


@implements([aten.copy_.default])
def _copy_(func: Any, args: Any, kwargs: Any) -> Any:
    dst, src = args[0], args[1]
    if isinstance(dst, Float8Tensor) and isinstance(src, Float8Tensor):
        dst._data.copy_(src._data)
        dst._scale.copy_(src._scale)
        return dst
    raise NotImplementedError("aten.copy_ between a Float8Tensor and a plain tensor is not supported")


def unwrap_data(x: Any) -> Any:
    return tree_map(lambda t: t._data if isinstance(t, Float8Tensor) else t, x)

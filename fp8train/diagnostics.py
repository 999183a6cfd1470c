"""How well a scaled low-precision payload uses its format's range: wasted bits, saturation, underflow.

These measure the *payload* of a scaled tensor, after the cast: the fp8 (or int8) ``data`` of a
``data / scale`` pair, a ``Float8Tensor``, or an ``MXTensor``. (``fp8train.metrics`` measures the
same quantities from the high-precision operand and the scale before the cast; on a payload the
rounding has already happened, so values can differ by up to half an ulp at the top.)

For a payload ``q`` of a format with largest value ``max`` and smallest subnormal ``tiny``::

    wasted_bits          mean over scale groups g with amax_g > 0 of  max(0, log2(max / amax_g)),
                         amax_g = max|q| over the group; if every group is zero: log2(max / tiny)
    saturation_fraction  #{ |q| >= max } / numel
    underflow_fraction   #{ hp != 0 and q == 0 } / #{ hp != 0 }

*Wasted bits* are binades at the top of the format the scaled values never reach: every one is a
binade of the tensor's small values pushed toward underflow. For an integer payload (int8) it is
literally the number of unused bits (the "scaled dtypes" definition).

A *scale group* is the set of elements sharing one scale: the whole tensor for a tensorwise
(0-dim) scale; for an axiswise scale, the dims where the scale has size 1 (``scale [M, 1]`` on
``data [M, K]``: one group per row); for an ``MXTensor``, one block. A zero group (an MX block of
zeros, a zero row) holds nothing to lose and is left out of the mean.

``saturation_fraction`` counts elements *at* ``max``: from the payload alone, an element clamped
by the saturating cast cannot be told from one that rounded to ``max``, so under dynamic
tensorwise scaling the amax element itself counts (one element in ``numel``).

Every function returns a 0-dim fp32 tensor on the payload's device and never syncs with the host,
so it can run every step and be logged later.

Example:
    >>> data = torch.tensor([28.0, -7.0, 0.0]).to(torch.float8_e4m3fn)
    >>> float(wasted_bits(data))                   # 448 / 28 = 2**4
    4.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from fp8train.mx import MXTensor
from fp8train.tensor import Float8Tensor

__all__ = ["Payload", "saturation_fraction", "underflow_fraction", "wasted_bits"]

#: a scaled tensor's low-precision part: fp8 / signed-int data, a Float8Tensor, or an MXTensor.
Payload = Union[Tensor, Float8Tensor, MXTensor]


@dataclass(frozen=True)
class _View:
    """A payload reduced to what the statistics need.

    Attributes:
        values: fp32 element values (scale not applied), the payload's logical shape (no padding).
        group_amax: fp32 max|value| of every scale group (any shape).
        valid: elements whose scale is finite (``None``: all); MX blocks with a NaN scale store 0s.
        max, tiny: largest and smallest positive magnitude of the element format.
    """

    values: Tensor
    group_amax: Tensor
    valid: Tensor | None
    max: float
    tiny: float


def _format_range(dtype: torch.dtype) -> tuple[float, float]:
    if dtype.is_floating_point and dtype.itemsize <= 4:
        f = torch.finfo(dtype)
        return float(f.max), float(f.smallest_normal * f.eps)
    if dtype in (torch.int8, torch.int16, torch.int32):
        return float(torch.iinfo(dtype).max), 1.0
    raise ValueError(
        f"payload dtype={dtype} is invalid; valid: a float8 / float16 / bfloat16 / float32 or signed int "
        "tensor, a Float8Tensor, or an MXTensor (pass the MXTensor itself, not its uint8 qdata)"
    )


def _group_dims(data: Tensor, scale: Tensor | None) -> tuple[int, ...]:
    """Dims of ``data`` that share one scale value."""
    if scale is None or scale.numel() == 1:
        return tuple(range(data.dim()))
    if scale.dim() > data.dim():
        raise ValueError(f"scale.shape={tuple(scale.shape)} is invalid for data.shape={tuple(data.shape)}; "
                         "valid: a shape broadcastable to data's")
    s_shape = (1,) * (data.dim() - scale.dim()) + tuple(scale.shape)
    for s, d in zip(s_shape, data.shape):
        if s not in (1, d):
            raise ValueError(
                f"scale.shape={tuple(scale.shape)} is invalid for data.shape={tuple(data.shape)}; "
                "valid: a shape broadcastable to data's (0-dim, or size 1 along the reduced dims)"
            )
    return tuple(i for i, (s, d) in enumerate(zip(s_shape, data.shape)) if s == 1 and d != 1)


def _group_amax(abs_values: Tensor, dims: tuple[int, ...]) -> Tensor:
    if abs_values.numel() == 0:
        return abs_values.new_zeros(0)
    if not dims:  # an elementwise scale: every element is its own group
        return abs_values
    return abs_values.amax(dim=dims)


def _view(payload: Payload, scale: Tensor | None = None) -> _View:
    if isinstance(payload, MXTensor):
        if scale is not None:
            raise ValueError("scale is given, but an MXTensor carries its own block scales; pass scale=None")
        fmt = payload.format
        elements = payload.elements()  # [..., Kp], padding zeros do not change a block's amax
        k = payload.orig_shape[-1]
        amax = elements.abs().unflatten(-1, (-1, payload.block_size)).amax(dim=-1)
        finite = (payload.scale_e8m0 != 255).repeat_interleave(payload.block_size, dim=-1)[..., :k]
        return _View(elements[..., :k], amax, finite, fmt.max, fmt.tiny)
    if isinstance(payload, Float8Tensor):
        if scale is not None:
            raise ValueError("scale is given, but a Float8Tensor carries its own scale; pass scale=None")
        payload, scale = payload._data, payload._scale
    if not isinstance(payload, Tensor):
        raise ValueError(f"payload of type {type(payload).__name__} is invalid; valid: Tensor, Float8Tensor, MXTensor")
    fmax, tiny = _format_range(payload.dtype)
    values = payload.detach().to(torch.float32)
    amax = _group_amax(values.abs(), _group_dims(values, scale))
    return _View(values, amax, None, fmax, tiny)


def wasted_bits(payload: Payload, scale: Tensor | None = None) -> Tensor:
    """Binades at the top of the format the payload leaves unused, averaged over scale groups.

    Args:
        payload: fp8 / signed-int data of a scaled tensor (its dtype is the format), a
            ``Float8Tensor``, or an ``MXTensor``.
        scale: only for plain ``data``: its fp32 scale, 0-dim (tensorwise) or broadcastable to
            ``data`` (axiswise); it decides the groups, its values are not used. ``None``: one group.

    Returns:
        0-dim fp32, in bits (binades), ``>= 0``.

    Example:
        >>> data = torch.tensor([[448.0, 1.0], [112.0, 2.0]]).to(torch.float8_e4m3fn)
        >>> float(wasted_bits(data, scale=torch.ones(2, 1)))     # rows waste 0 and 2 bits
        1.0
    """
    v = _view(payload, scale)
    amax = v.group_amax
    live = amax > 0  # NaN groups are not live either
    per_group = torch.log2(v.max / torch.clamp(amax, max=v.max))
    total = torch.where(live, per_group, torch.zeros_like(per_group)).sum()
    n = live.sum()
    mean = total / torch.clamp(n, min=1).to(torch.float32)
    whole_range = torch.full_like(mean, math.log2(v.max / v.tiny))
    return torch.where(n > 0, mean, whole_range)


def saturation_fraction(payload: Payload) -> Tensor:
    """Fraction of the payload's elements at the format's largest magnitude (0-dim fp32).

    Args:
        payload: as in ``wasted_bits``; an ``MXTensor``'s padding is not counted.
    """
    v = _view(payload)
    if v.values.numel() == 0:
        return torch.zeros((), device=v.values.device)
    at_max = (v.values.abs() >= v.max).sum().to(torch.float32)
    return at_max / v.values.numel()


def underflow_fraction(hp: Tensor, payload: Payload) -> Tensor:
    """Fraction of the nonzero elements of ``hp`` that are zero in the payload (0-dim fp32).

    Args:
        hp: the high-precision tensor the payload was cast from (before or after scaling: only its
            zero pattern is used), shaped like the payload (an ``MXTensor``'s ``orig_shape``).
        payload: as in ``wasted_bits``. Blocks of an ``MXTensor`` with a NaN scale are left out.

    Returns:
        0-dim fp32 in [0, 1]; 0 when ``hp`` has no nonzero element.
    """
    v = _view(payload)
    if tuple(hp.shape) != tuple(v.values.shape):
        raise ValueError(
            f"hp.shape={tuple(hp.shape)} is invalid; valid: the payload's shape {tuple(v.values.shape)}"
        )
    nonzero = hp.detach() != 0
    if v.valid is not None:
        nonzero = nonzero & v.valid
    flushed = (nonzero & (v.values == 0)).sum().to(torch.float32)
    return flushed / torch.clamp(nonzero.sum(), min=1).to(torch.float32)

"""fp8 health statistics: what a cast does to an operand, measured, and aggregated across ranks.

For an operand ``x`` cast with scale ``s`` to an fp8 format with largest value ``max``
(448 for e4m3fn, 57344 for e5m2) and smallest subnormal ``tiny`` (2**-9, 2**-16)::

    scaled       y = x * s                       (what the saturating cast clamps, then rounds)
    amax         max|x|
    saturation   #{ |y| > max + ulp_max / 2 } / numel
                 elements the clamp changed by more than rounding would (an element that lands
                 exactly on ``max``, as the amax does under dynamic scaling, is not saturated)
    underflow    #{ x != 0 and fp8(y) == 0 } / #{ x != 0 }
                 nonzero elements flushed to zero by the cast (counted as 0 < |y| <= tiny/2,
                 which is exactly what round-to-nearest-even sends to zero)
    wasted_bits  log2(max / max|y|), at least 0
                 binades (powers of two) at the top of the fp8 range the scaled tensor leaves
                 unused. For an integer format this is literally the number of unused bits (the
                 "scaled dtypes" definition); for fp8 every wasted binade moves one more binade of
                 the tensor's small values toward underflow. An all-zero tensor wastes the whole
                 range, ``log2(max / tiny)`` (17.8 for e4m3fn, 31.8 for e5m2).

These are measured on the high-precision operand and its scale, *before* the cast, which is what
training has at hand (no fp8 payload is kept) and what tells clamping from rounding.

MX operands (``scaling_granularity="mx"``) have one power-of-two scale per block, so the probe
quantizes them to MX (blocks along the inner dim of their first GEMM, as the layer does) and
reports, per operand: ``wasted_bits`` from ``fp8train.diagnostics.wasted_bits`` of the payload
(the mean over blocks of each block's unused top binades), ``underflow`` as above, and
``saturation`` as above with ``s = 2**-e`` per block: the elements the OCP scale rule clamps
(``floor(log2(amax)) - emax`` maps a block's amax into ``[256, 512)`` for e4m3, above 448 the
top of the range is cut off; about 0.5% of Gaussian data). There is no single scale to report.
``fp8train.diagnostics`` measures the same quantities on a payload *after* the cast (a
``Float8Tensor``, an ``MXTensor``): underflow agrees exactly, wasted bits up to the rounding of the
amax element, and its saturation counts elements *at* max (rounded there or clamped).

* ``saturation_threshold`` / ``underflow_threshold`` / ``wasted_bits_from_amax``: the format math.
* ``OperandProbe``: forward hooks (and tensor hooks on outputs) on ``Float8Linear`` layers that re-run
  each layer's cast math on its operands (input, weight in forward; grad_output in backward) and
  accumulate counts on device. Attach it for the steps you want to measure only.
* ``Float8Stats``: a ``torchmetrics.Metric`` holding ``[num_layers, 3]`` states (roles in the order
  input, weight, grad_output) that reduce correctly across micro-batches and ranks (max for amax,
  min for scale, sum for counts).

This module does not import Lightning; ``fp8train.lightning.Float8Training`` drives it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torchmetrics import Metric

from fp8train.config import CastConfig, GemmInputRole, ScalingType
from fp8train.diagnostics import wasted_bits
from fp8train.linear import Float8Linear
from fp8train.mx import MXTensor, to_mx
from fp8train.mx_ops import MX_ELEM_OF_DTYPE
from fp8train.scaling import amax_to_scale, fp8_max
from fp8train.tensor import Float8Tensor

__all__ = [
    "ROLES",
    "Float8Stats",
    "OperandProbe",
    "ProbeResult",
    "format_binades",
    "local_shard",
    "mx_payload",
    "operand_cast_config",
    "saturation_threshold",
    "underflow_threshold",
    "wasted_bits_from_amax",
]

#: operand roles, in the order of the second axis of every ``[num_layers, 3]`` statistic.
ROLES: tuple[str, ...] = tuple(r.value for r in GemmInputRole)  # input, weight, grad_output


# --- format constants ----------------------------------------------------------------------------
def saturation_threshold(dtype: torch.dtype) -> float:
    """``max + ulp/2`` of the top binade: above it the clamp, not rounding, decides the value.

    464 for e4m3fn (max 448, ulp 32), 61440 for e5m2 (max 57344, ulp 8192).
    """
    m = fp8_max(dtype)
    ulp = 2.0 ** math.floor(math.log2(m)) * torch.finfo(dtype).eps
    return m + ulp / 2


def _tiny(dtype: torch.dtype) -> float:
    """Smallest positive (subnormal) value of an fp8 format: 2**-9 for e4m3fn, 2**-16 for e5m2."""
    f = torch.finfo(dtype)
    return float(f.smallest_normal * f.eps)


def format_binades(dtype: torch.dtype) -> float:
    """``log2(max / tiny)``: the binades an fp8 format spans (17.8 for e4m3fn, 31.8 for e5m2)."""
    return math.log2(fp8_max(dtype) / _tiny(dtype))


def underflow_threshold(dtype: torch.dtype) -> float:
    """``tiny / 2``: round-to-nearest-even sends ``0 < |y| <= tiny/2`` to zero (the tie goes to the
    even neighbour, 0), so comparing against it counts exactly what the cast flushes."""
    return _tiny(dtype) / 2


def wasted_bits_from_amax(scaled_amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``log2(max / max|x * scale|)``, at least 0, from the scaled amax alone (elementwise; a zero
    amax wastes the whole range, ``format_binades``).

    Example:
        >>> wasted_bits_from_amax(torch.tensor([448.0, 28.0, 900.0]), torch.float8_e4m3fn)
        tensor([0., 4., 0.])
    """
    m = fp8_max(dtype)
    wasted = torch.log2(m / torch.clamp(scaled_amax.to(torch.float32), max=m))
    return torch.where(scaled_amax > 0, wasted, torch.full_like(wasted, format_binades(dtype)))


def _underflow_counts(
    x_abs: torch.Tensor, y_abs: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(#nonzero elements that the cast of ``y`` flushes to 0, #nonzero elements)."""
    nonzero = x_abs != 0
    return (nonzero & (y_abs <= underflow_threshold(dtype))).sum(), nonzero.sum()


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2/TP weights), else ``t``, in high precision (an
    operand that arrived in fp8, e.g. a weight after FSDP2's fp8 all-gather, is dequantized). Sums
    and maxes of shards aggregate to the whole tensor's in ``Float8Stats`` (counts add, amax
    maxes, scale mins)."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.dequantize() if isinstance(t, Float8Tensor) else t


# --- per-layer hooks ---------------------------------------------------------------------------------
def operand_cast_config(layer: Float8Linear, role: str) -> CastConfig:
    """The cast a role's operand gets in its first GEMM (output for input/weight, grad_input for
    grad_output); this is the cast the probe measures."""
    return getattr(layer.config, f"cast_config_{role}")


def mx_payload(x: torch.Tensor, cfg: CastConfig) -> MXTensor:
    """The MX payload of a 2-D operand ``x`` under the ``mx`` cast ``cfg``, blocked along its last
    dim (the inner dim of the operand's first GEMM, as ``operand_cast_config`` defines it)."""
    return to_mx(x, MX_ELEM_OF_DTYPE[cfg.target_dtype], cfg.block_size)


def _operand_scale(layer: Float8Linear, role: str, x_abs: torch.Tensor, amax: torch.Tensor,
                   cfg: CastConfig) -> torch.Tensor:
    """The scale ``Float8Linear`` uses for this operand on this step (mirrors ``linear._cast``):
    the stored delayed scale once synced, else dynamic from the operand's amax (per row along the
    GEMM's inner dim ``-1`` for axiswise casts). ``x_abs`` is ``|x|`` in fp32, ``amax`` its max."""
    if cfg.scaling_type is ScalingType.DELAYED and getattr(layer, "is_amax_initialized", False):
        return getattr(layer, f"fp8_scale_{role}")
    if cfg.axiswise:
        amax = x_abs.amax(dim=-1, keepdim=True)
    return amax_to_scale(amax, cfg.target_dtype, layer.config.round_scales_to_power_of_2)


@dataclass
class ProbeResult:
    """What an ``OperandProbe`` measured; every tensor is ``[num_layers, 3]`` on one device.

    Attributes:
        amax: max|x| over the measured micro-batches (fp32).
        scaled_amax: max|x * scale| (fp32).
        scale: the smallest scale used (fp32; +inf where not measured; for axiswise casts the
            smallest row scale).
        saturated, underflow, nonzero, numel: element counts (int64).
        seen: number of operand tensors measured (int64; 0 where not measured).
        wasted_sum, wasted_n: sum (fp32) and count (int64) of wasted bits measured on payloads
            (MX operands, whose blocks have no single scaled amax); 0 elsewhere.
        full: ``False`` for a saturation-only probe: then only ``saturated``, ``numel`` and
            ``seen`` are filled (amax, scale and underflow were not measured).
    """

    amax: torch.Tensor
    scaled_amax: torch.Tensor
    scale: torch.Tensor
    saturated: torch.Tensor
    underflow: torch.Tensor
    nonzero: torch.Tensor
    numel: torch.Tensor
    seen: torch.Tensor
    wasted_sum: torch.Tensor
    wasted_n: torch.Tensor
    full: bool = True


class OperandProbe:
    """Measure the fp8 casts of chosen layers' operands while attached.

    ``attach()`` registers a forward hook on each layer that measures input and weight and puts a
    tensor hook on the layer's output to measure grad_output when backward reaches it. Each
    measurement re-runs the layer's cast math on the operand: the same scale (stored delayed
    scale, or dynamic from the operand's own amax), the same saturating cast.
    Statistics accumulate on the layer's device (no host sync) over every forward/backward until
    ``result()``; ``detach()`` removes the hooks. Layers with ``fp8_enabled=False`` and operands
    whose cast is disabled are not measured.

    Args:
        layers: the layers, in the order of the result's first axis.
        roles: per layer, which of (input, weight, grad_output) to measure.
        full: measure everything (amax, scale, scaled amax, saturation, underflow; about five
            elementwise passes per operand). ``False`` counts saturation only, as the divergence
            guard needs: ``|x| > threshold / scale`` against the stored delayed scale (two passes),
            and nothing for dynamically scaled operands, which cannot saturate.

    Example:
        >>> probe = OperandProbe(layers, [(True, True, True)] * len(layers))
        >>> probe.attach(); loss = model(x).sum(); loss.backward(); probe.detach()
        >>> probe.result().saturated  # [num_layers, 3] int64
    """

    def __init__(self, layers: Sequence[Float8Linear], roles: Sequence[tuple[bool, bool, bool]],
                 full: bool = True) -> None:
        if len(layers) != len(roles):
            raise ValueError(f"OperandProbe: got {len(layers)} layers but {len(roles)} role masks")
        self.layers = list(layers)
        self.roles = [tuple(r) for r in roles]
        self.full = full
        self.paused = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._acc: list[dict[str, torch.Tensor]] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        """Register the hooks and zero the accumulators (idempotent while attached)."""
        if self._handles:
            return
        self._acc = []
        for i, layer in enumerate(self.layers):
            dev = layer.weight.device
            self._acc.append({
                "max": torch.zeros(3, 2, device=dev),
                "scale": torch.full((3,), math.inf, device=dev),
                "count": torch.zeros(3, 5, dtype=torch.int64, device=dev),
                "wasted": torch.zeros(3, 2, device=dev),  # MX operands: sum of wasted bits, count
            })
            if any(self.roles[i]):
                self._handles.append(layer.register_forward_hook(self._hook(i)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, i: int):
        want_in, want_w, want_go = self.roles[i]

        def forward_hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.paused or not getattr(layer, "fp8_enabled", True) or not args:
                return
            x = args[0]
            device_type = x.device.type
            if want_in:
                if torch.is_autocast_enabled(device_type):  # the layer casts its input first
                    x = x.to(torch.get_autocast_dtype(device_type))
                x = local_shard(x)
                self._measure(i, layer, 0, x.reshape(-1, x.shape[-1]))
            if want_w:
                self._measure(i, layer, 1, local_shard(layer.weight))
            if want_go and isinstance(output, torch.Tensor) and output.requires_grad:
                # a tensor hook on the output sees grad_output before the layer's backward runs;
                # lighter than a full backward hook (no autograd wrapper around the module)
                output.register_hook(lambda g: self._on_grad_output(i, layer, g))

        return forward_hook

    def _on_grad_output(self, i: int, layer: Float8Linear, g: torch.Tensor) -> None:
        if not self.paused:
            g = local_shard(g)
            self._measure(i, layer, 2, g.reshape(-1, g.shape[-1]))

    @torch.no_grad()
    def _measure(self, i: int, layer: Float8Linear, r: int, x: torch.Tensor) -> None:
        role = ROLES[r]
        cfg = operand_cast_config(layer, role)
        if not cfg.enabled:
            return
        acc = self._acc[i]
        one = torch.ones((), dtype=torch.int64, device=x.device)
        numel = torch.tensor(x.numel(), dtype=torch.int64, device=x.device)
        zero = torch.zeros((), dtype=torch.int64, device=x.device)
        if not self.full:
            stored = cfg.scaling_type is ScalingType.DELAYED and getattr(layer, "is_amax_initialized", False)
            saturated = zero
            if stored:  # dynamic scales map the amax onto the fp8 max: nothing can saturate
                limit = saturation_threshold(cfg.target_dtype) / getattr(layer, f"fp8_scale_{role}")
                saturated = (x.detach().abs().to(torch.float32) > limit).sum()
            acc["count"][r] += torch.stack([saturated, zero, zero, numel, one])
            return
        if cfg.mx:
            self._measure_mx(acc, r, x.detach(), cfg, one, numel)
            return
        a = x.detach().abs().to(torch.float32)
        amax = a.amax()
        scale = _operand_scale(layer, role, a, amax, cfg)
        y = a * scale  # |x * scale|, what the saturating cast clamps and rounds
        scaled_amax = y.amax() if scale.dim() > 0 else amax * scale  # same value, one pass fewer
        acc["max"][r] = torch.maximum(acc["max"][r], torch.stack([amax, scaled_amax.to(torch.float32)]))
        acc["scale"][r] = torch.minimum(acc["scale"][r], scale.amin().to(torch.float32))
        saturated = (y > saturation_threshold(cfg.target_dtype)).sum()
        under, nonzero = _underflow_counts(a, y, cfg.target_dtype)
        acc["count"][r] += torch.stack([saturated, under, nonzero, numel, one])

    @staticmethod
    def _measure_mx(acc: dict[str, torch.Tensor], r: int, x: torch.Tensor, cfg: CastConfig,
                    one: torch.Tensor, numel: torch.Tensor) -> None:
        mx = mx_payload(x, cfg)
        fmt = mx.format
        k = x.shape[-1]
        q = mx.elements()[..., :k].abs()  # element values without their block scale
        deq = mx.to_dtype(torch.float32).abs()
        a = x.abs().to(torch.float32)
        # an element at the format's max was clamped beyond rounding when |x| > 2**e * threshold;
        # 2**e = |deq| / max exactly (both are powers of two times max)
        at_max = q >= fmt.max
        saturated = (at_max & (a > deq / fmt.max * saturation_threshold(cfg.target_dtype))).sum()
        nonzero = a != 0
        under = (nonzero & (deq == 0)).sum()  # NaN blocks dequantize to NaN, never counted
        amax = a.amax()
        acc["max"][r, 0] = torch.maximum(acc["max"][r, 0], amax)
        acc["wasted"][r] += torch.stack([wasted_bits(mx), torch.ones((), device=x.device)])
        acc["count"][r] += torch.stack([saturated, under, nonzero.sum(), numel, one])

    def result(self) -> ProbeResult:
        """Stack the accumulators (on the first layer's device); no host sync."""
        if not self._acc:
            raise RuntimeError("OperandProbe.result() before attach(): nothing was measured")
        dev = self._acc[0]["max"].device
        maxes = torch.stack([a["max"].to(dev) for a in self._acc])
        counts = torch.stack([a["count"].to(dev) for a in self._acc])
        scale = torch.stack([a["scale"].to(dev) for a in self._acc])
        wasted = torch.stack([a["wasted"].to(dev) for a in self._acc])
        return ProbeResult(
            amax=maxes[..., 0], scaled_amax=maxes[..., 1], scale=scale,
            saturated=counts[..., 0], underflow=counts[..., 1], nonzero=counts[..., 2],
            numel=counts[..., 3], seen=counts[..., 4], wasted_sum=wasted[..., 0],
            wasted_n=wasted[..., 1].to(torch.int64), full=self.full,
        )


# --- torchmetrics aggregation -----------------------------------------------------------------------
class Float8Stats(Metric):
    """Per layer and role fp8 statistics that aggregate across updates and ranks.

    States are ``[num_layers, 3]`` (roles input, weight, grad_output). ``update`` takes any subset
    of the statistics; what was never given stays "not observed" and ``compute`` reports NaN there.
    Across ranks: amax and scaled_amax reduce with max, scale with min, counts with sum,
    ``nonfinite`` (a running counter identical on every rank) with max.

    Args:
        target_dtypes: ``[num_layers][3]`` fp8 dtypes of each operand's cast (``None``: not fp8),
            used for the fp8 max in ``wasted_bits``.

    Example:
        >>> m = Float8Stats([[torch.float8_e4m3fn, torch.float8_e4m3fn, torch.float8_e5m2]])
        >>> m.update(amax=torch.tensor([[2.0, 1.0, 0.5]]), scale=torch.tensor([[14.0, 448.0, 114688.0]]))
        >>> m.compute()["wasted_bits"]  # log2(448 / (2 * 14)) = 4 for the input
        tensor([[4.0000, 0.0000, 0.0000]])
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, target_dtypes: Sequence[Sequence[torch.dtype | None]], **kwargs) -> None:
        super().__init__(**kwargs)
        n = len(target_dtypes)
        self.num_layers = n
        maxes = [[fp8_max(d) if d is not None else math.nan for d in row] for row in target_dtypes]
        binades = [[format_binades(d) if d is not None else math.nan for d in row] for row in target_dtypes]
        self.register_buffer("fp8_max", torch.tensor(maxes, dtype=torch.float32).reshape(n, 3), persistent=False)
        self.register_buffer("binades", torch.tensor(binades, dtype=torch.float32).reshape(n, 3), persistent=False)
        f32 = dict(dtype=torch.float32)
        i64 = dict(dtype=torch.int64)
        self.add_state("amax", torch.zeros(n, 3, **f32), dist_reduce_fx="max")
        self.add_state("amax_seen", torch.zeros(n, 3, **i64), dist_reduce_fx="sum")
        self.add_state("scaled_amax", torch.zeros(n, 3, **f32), dist_reduce_fx="max")
        self.add_state("scaled_seen", torch.zeros(n, 3, **i64), dist_reduce_fx="sum")
        self.add_state("scale", torch.full((n, 3), math.inf, **f32), dist_reduce_fx="min")
        self.add_state("saturated", torch.zeros(n, 3, **i64), dist_reduce_fx="sum")
        self.add_state("sat_numel", torch.zeros(n, 3, **i64), dist_reduce_fx="sum")
        self.add_state("underflow", torch.zeros(n, 3, **i64), dist_reduce_fx="sum")
        self.add_state("nonzero", torch.zeros(n, 3, **i64), dist_reduce_fx="sum")
        self.add_state("under_seen", torch.zeros(n, 3, **i64), dist_reduce_fx="sum")
        self.add_state("nonfinite", torch.full((n, 3), -1, **i64), dist_reduce_fx="max")
        # wasted bits measured directly on payloads (MX operands): sum and count, averaged in compute
        self.add_state("wasted_sum", torch.zeros(n, 3, **f32), dist_reduce_fx="sum")
        self.add_state("wasted_n", torch.zeros(n, 3, **i64), dist_reduce_fx="sum")

    def update(  # type: ignore[override]
        self,
        amax: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        scaled_amax: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        probe: ProbeResult | None = None,
        nonfinite: torch.Tensor | None = None,
        wasted_bits: torch.Tensor | None = None,
    ) -> None:
        """Fold in one step's statistics.

        Args:
            amax, scale: ``[L, 3]`` fp32, e.g. read from delayed-scaling buffers; ``scaled_amax``
                defaults to ``amax * scale``.
            mask: ``[L, 3]`` bool, which entries of ``amax``/``scale`` are valid (default all).
            probe: an ``OperandProbe`` result (element-level counts).
            nonfinite: ``[L, 3]`` int64 running counters of skipped non-finite amax.
            wasted_bits: ``[L, 3]`` fp32 wasted bits measured on payloads (``fp8train.diagnostics``,
                e.g. of MX weights); NaN where not measured. Where any were given, ``compute``
                reports their mean instead of the value derived from ``scaled_amax``.
        """
        if amax is not None:
            m = torch.ones_like(amax, dtype=torch.bool) if mask is None else mask.to(amax.device)
            if scaled_amax is None and scale is not None:
                scaled_amax = amax * scale
            self._fold(amax, scale, scaled_amax, m)
        if probe is not None:
            seen = probe.seen > 0
            self.saturated += probe.saturated
            self.sat_numel += probe.numel
            if probe.full:
                self._fold(probe.amax, probe.scale, probe.scaled_amax, seen)
                self.underflow += probe.underflow
                self.nonzero += probe.nonzero
                self.under_seen += seen.to(torch.int64)
        if nonfinite is not None:
            self.nonfinite = torch.maximum(self.nonfinite, nonfinite.to(torch.int64))
        if probe is not None and probe.full:
            self.wasted_sum += probe.wasted_sum.to(torch.float32)
            self.wasted_n += probe.wasted_n
        if wasted_bits is not None:
            given = ~torch.isnan(wasted_bits)
            self.wasted_sum += torch.where(given, wasted_bits.to(torch.float32), torch.zeros_like(self.wasted_sum))
            self.wasted_n += given.to(torch.int64)

    def _fold(self, amax: torch.Tensor, scale: torch.Tensor | None, scaled_amax: torch.Tensor | None,
              m: torch.Tensor) -> None:
        # NaN must survive (it is what the divergence guard looks for): torch.maximum propagates it
        self.amax = torch.where(m, torch.maximum(self.amax, amax.to(torch.float32)), self.amax)
        self.amax_seen += m.to(torch.int64)
        if scale is not None:
            self.scale = torch.where(m, torch.minimum(self.scale, scale.to(torch.float32)), self.scale)
        if scaled_amax is not None:
            self.scaled_amax = torch.where(m, torch.maximum(self.scaled_amax, scaled_amax.to(torch.float32)),
                                           self.scaled_amax)
            self.scaled_seen += m.to(torch.int64)

    def compute(self) -> dict[str, torch.Tensor]:
        """``[L, 3]`` fp32 tensors, NaN where not observed: ``amax``, ``amax_nonfinite`` (1.0 where
        the observed amax is NaN/inf), ``scale``, ``wasted_bits``, ``saturation``, ``underflow``,
        ``nonfinite`` (delayed scaling's count of skipped non-finite syncs)."""
        nan = torch.full_like(self.amax, math.nan)
        amax = torch.where(self.amax_seen > 0, self.amax, nan)
        scale = torch.where(torch.isfinite(self.scale), self.scale, nan)
        m = self.fp8_max.to(self.amax.device)
        wasted = torch.log2(m / torch.clamp(self.scaled_amax, max=m))
        wasted = torch.where(self.scaled_amax > 0, wasted, self.binades.to(self.amax.device))
        wasted = torch.where((self.scaled_seen > 0) & torch.isfinite(self.scaled_amax), wasted, nan)
        measured = self.wasted_sum / torch.clamp(self.wasted_n, min=1).to(torch.float32)
        wasted = torch.where(self.wasted_n > 0, measured, wasted)
        saturation = torch.where(self.sat_numel > 0, self.saturated / torch.clamp(self.sat_numel, min=1), nan)
        underflow = torch.where(self.under_seen > 0, self.underflow / torch.clamp(self.nonzero, min=1), nan)
        nonfinite = torch.where(self.nonfinite >= 0, self.nonfinite.to(torch.float32), nan)
        amax_nonfinite = torch.where(self.amax_seen > 0, (~torch.isfinite(self.amax)).to(torch.float32), nan)
        return {
            "amax": amax,
            "amax_nonfinite": amax_nonfinite,
            "scale": scale,
            "wasted_bits": wasted,
            "saturation": saturation.to(torch.float32),
            "underflow": underflow.to(torch.float32),
            "nonfinite": nonfinite,
        }

"""Inference export: replace ``nn.Linear`` layers with weight-quantized layers, in place.

``to_inference(model, weight_format)`` quantizes every ``nn.Linear`` (``Float8Linear`` included:
it subclasses ``nn.Linear``; the quantization reads its high-precision ``.weight``) into one of:

==========  =========================  =====================================  =================
format      layer                      weight storage                         scale (per row)
==========  =========================  =====================================  =================
fp8         ``Float8InferenceLinear``  ``weight_fp8``  float8_e4m3fn [N, K]    amax / 448, fp32
int8        ``Int8WeightOnlyLinear``   ``weight_int8`` int8 [N, K]             amax / 127, fp32
ternary     ``TernaryLinear``          ``weight_packed`` uint8 [ceil(N*K/4)]   mean|W|, fp32
==========  =========================  =====================================  =================

Activations stay in their own dtype; each forward dequantizes (or rescales) and calls
``F.linear``, so it runs on any device. Everything is a registered buffer (``bias`` too), so a
model round-trips through ``state_dict``: export a model of the same architecture, then load::

    fresh = to_inference(build_model(), "int8")      # its random weights are overwritten next
    fresh.load_state_dict(exported.state_dict())

Note ``model.to(torch.bfloat16)`` also converts the float8 weight buffer (torch treats float8 as
floating point): outputs stay the same (e4m3 values are exact in bf16/fp16), the memory saving is
lost. Change the activation dtype instead.

Ternary packing: ``W ≈ q * scale`` with ``q = clamp(round(W / scale), -1, 1)``; ``q + 1`` (codes
0, 1, 2 for -1, 0, +1) is stored four codes per byte over the row-major flattened weight, element
``4i + j`` in bits ``2j .. 2j+1`` (element ``4i`` in the lowest two bits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "WEIGHT_FORMATS",
    "ExportReport",
    "Float8InferenceLinear",
    "Int8WeightOnlyLinear",
    "TernaryLinear",
    "export_report",
    "pack_ternary",
    "to_inference",
    "unpack_ternary",
]

ModuleFilter = Callable[[nn.Module, str], bool]
_REPORT_ATTR = "_fp8train_export_report"
_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
_INT8_MAX = 127.0
#: smallest row amax / absmean used for a scale, so an all-zero row gets a finite scale.
_EPS = 1e-12


# --- ternary packing ----------------------------------------------------------------------------------
def pack_ternary(t: Tensor) -> Tensor:
    """Pack values in {-1, 0, 1} four per byte.

    Args:
        t: any shape, any real dtype, every element -1, 0 or 1.

    Returns:
        uint8 ``[ceil(t.numel() / 4)]``: codes ``t + 1`` over ``t.flatten()``, element ``4i + j``
        in bits ``2j .. 2j+1``; the unused slots of the last byte hold code 1 (zero).

    Raises:
        ValueError: an element outside {-1, 0, 1}.

    Example:
        >>> pack_ternary(torch.tensor([-1, 0, 1, 1, 0]))     # 0 | 1<<2 | 2<<4 | 2<<6, then 1
        tensor([164,  85], dtype=torch.uint8)
    """
    flat = t.detach().flatten()
    if not bool(((flat == -1) | (flat == 0) | (flat == 1)).all()):
        raise ValueError("pack_ternary: t has values outside {-1, 0, 1}; valid: only -1, 0 and 1")
    codes = (flat.to(torch.int32) + 1).to(torch.uint8)
    pad = (-codes.numel()) % 4
    codes = F.pad(codes, (0, pad), value=1).view(-1, 4)
    return codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)


def unpack_ternary(packed: Tensor, numel: int) -> Tensor:
    """Inverse of ``pack_ternary``: int8 ``[numel]`` in {-1, 0, 1} (reshape to the original shape).

    Raises:
        ValueError: ``packed`` is not uint8, or its size does not hold exactly ``numel`` values.
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_ternary: packed.dtype={packed.dtype} is invalid; valid: torch.uint8")
    if numel < 0 or -(-numel // 4) != packed.numel():
        raise ValueError(
            f"unpack_ternary: numel={numel} is invalid for {packed.numel()} packed bytes; "
            f"valid: {4 * packed.numel() - 3} to {4 * packed.numel()}"
        )
    flat = packed.flatten()
    codes = torch.stack([(flat >> s) & 0b11 for s in (0, 2, 4, 6)], dim=-1).flatten()
    return codes[:numel].to(torch.int8) - 1


# --- quantizers: W [N, K] (any float dtype) → payload + fp32 row scale ---------------------------------
def _rowwise_absmax_scale(w: Tensor, qmax: float) -> Tensor:
    return torch.clamp(w.abs().amax(dim=1), min=_EPS) / qmax


def _quantize_fp8(w: Tensor) -> tuple[Tensor, Tensor]:
    scale = _rowwise_absmax_scale(w, _E4M3_MAX)
    q = torch.clamp(w / scale[:, None], -_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    scale = _rowwise_absmax_scale(w, _INT8_MAX)
    # symmetric: -128 is never used, so -q is always representable
    q = torch.clamp(torch.round(w / scale[:, None]), -_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q, scale


def _quantize_ternary(w: Tensor) -> tuple[Tensor, Tensor]:
    # absmean per output row (BitNet b1.58 uses one per tensor; per row fits trained weights better)
    scale = torch.clamp(w.abs().mean(dim=1), min=_EPS)
    q = torch.clamp(torch.round(w / scale[:, None]), -1, 1)
    return pack_ternary(q), scale


# --- layers ---------------------------------------------------------------------------------------------
class _QuantizedLinear(nn.Module):
    """Shared shape bookkeeping, bias handling and construction from an ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bias_dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, mod: nn.Linear) -> "_QuantizedLinear":
        """Quantize ``mod``'s weight (read in fp32); the bias is copied in its own dtype."""
        w = mod.weight
        bias_dtype = mod.bias.dtype if mod.bias is not None else w.dtype
        new = cls(mod.in_features, mod.out_features, bias=mod.bias is not None, bias_dtype=bias_dtype,
                  device=w.device)
        with torch.no_grad():
            new._load_weight(w.detach().to(torch.float32))
            if mod.bias is not None:
                new.bias.copy_(mod.bias.detach())
        return new

    def _load_weight(self, w: Tensor) -> None:
        raise NotImplementedError

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight the layer multiplies by, ``[out_features, in_features]`` in ``dtype``."""
        raise NotImplementedError

    def _add_bias(self, out: Tensor) -> Tensor:
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Float8InferenceLinear(_QuantizedLinear):
    """``y = x @ (weight_fp8 * weight_scale[:, None]).T + bias``, in ``x``'s dtype.

    Buffers: ``weight_fp8`` float8_e4m3fn ``[N, K]``; ``weight_scale`` fp32 ``[N]`` (row amax / 448,
    so each row's largest weight maps to 448); ``bias`` ``[N]`` or ``None``.
    On an fp8 GPU the same buffers feed ``torch._scaled_mm`` with a rowwise scale; here the weight
    is dequantized, which is correct everywhere.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 bias_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, bias_dtype, device)
        self.register_buffer(
            "weight_fp8", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn, device=device)
        )

    def _load_weight(self, w: Tensor) -> None:
        self.weight_fp8, self.weight_scale = _quantize_fp8(w)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.weight_fp8.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """x ``[..., in_features]`` → ``[..., out_features]``, same dtype."""
        return self._add_bias(F.linear(x, self.dequantized_weight(x.dtype)))


class Int8WeightOnlyLinear(_QuantizedLinear):
    """W8A16: ``y = (x @ weight_int8.T) * weight_scale + bias``, in ``x``'s dtype.

    Buffers: ``weight_int8`` int8 ``[N, K]`` in [-127, 127]; ``weight_scale`` fp32 ``[N]`` (row
    absmax / 127); ``bias``. The row scale factors out of the GEMM, so it is applied to the output:
    N multiplies per token instead of N*K. With fp16 activations the unscaled product (weights up to
    127) is larger than the result; keep that in mind for very wide layers.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 bias_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, bias_dtype, device)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))

    def _load_weight(self, w: Tensor) -> None:
        self.weight_int8, self.weight_scale = _quantize_int8(w)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """x ``[..., in_features]`` → ``[..., out_features]``, same dtype."""
        return self._add_bias(F.linear(x, self.weight_int8.to(x.dtype)) * self.weight_scale.to(x.dtype))


class TernaryLinear(_QuantizedLinear):
    """``y = (x @ q.T) * weight_scale + bias`` with ``q`` in {-1, 0, 1}, in ``x``'s dtype.

    Buffers: ``weight_packed`` uint8 ``[ceil(N*K / 4)]`` (see ``pack_ternary``); ``weight_scale``
    fp32 ``[N]``, the absmean ``mean|W|`` of each output row; ``bias``. A weight is rounded to
    ``-scale``, 0 or ``+scale``. Post-training ternarization of a model trained in high precision
    loses a lot (see the SQNR in tests/test_export.py); it is meant for models trained ternary-aware.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 bias_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, bias_dtype, device)
        n_bytes = -(-out_features * in_features // 4)
        self.register_buffer("weight_packed", torch.full((n_bytes,), 0b01010101, dtype=torch.uint8, device=device))

    def _load_weight(self, w: Tensor) -> None:
        self.weight_packed, self.weight_scale = _quantize_ternary(w)

    def ternary_weight(self) -> Tensor:
        """int8 ``[out_features, in_features]`` in {-1, 0, 1}."""
        return unpack_ternary(self.weight_packed, self.out_features * self.in_features).view(
            self.out_features, self.in_features
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.ternary_weight().to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """x ``[..., in_features]`` → ``[..., out_features]``, same dtype."""
        return self._add_bias(F.linear(x, self.ternary_weight().to(x.dtype)) * self.weight_scale.to(x.dtype))


#: ``weight_format`` name → layer class.
WEIGHT_FORMATS: dict[str, type[_QuantizedLinear]] = {
    "fp8": Float8InferenceLinear,
    "int8": Int8WeightOnlyLinear,
    "ternary": TernaryLinear,
}


# --- the swap -------------------------------------------------------------------------------------------
@dataclass
class ExportReport:
    """What ``to_inference`` did.

    Attributes:
        weight_format: the format exported layers use.
        exported: fully-qualified names of replaced layers (``""`` for a root ``nn.Linear``).
        skipped: name → reason, for linears left in high precision.
        bytes_before: bytes of the exported layers' weight and bias before export.
        bytes_after: bytes of their buffers after export (payload, scales, bias).
    """

    weight_format: str
    exported: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def compression(self) -> float:
        """``bytes_before / bytes_after`` (0 when nothing was exported)."""
        return self.bytes_before / self.bytes_after if self.bytes_after else 0.0

    def __str__(self) -> str:
        return (
            f"{self.weight_format}: {len(self.exported)} linears exported, {len(self.skipped)} skipped, "
            f"{self.bytes_before} -> {self.bytes_after} bytes ({self.compression:.2f}x)"
        )


def _linear_bytes(mod: nn.Linear) -> int:
    return sum(p.nbytes for p in (mod.weight, mod.bias) if p is not None)


def to_inference(
    model: nn.Module,
    weight_format: str = "fp8",
    module_filter_fn: ModuleFilter | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` (subclasses included) with a weight-quantized layer.

    Args:
        model: the model, changed in place (or a single ``nn.Linear``: the new layer is returned).
        weight_format: ``"fp8"``, ``"int8"`` or ``"ternary"`` (see the module docstring).
        module_filter_fn: ``(module, fqn) -> bool``; ``False`` keeps that linear as it is. ``fqn``
            is the name as in ``named_modules()``.

    Returns:
        ``model`` with layers replaced. ``export_report(model)`` gives the ``ExportReport``.

    Raises:
        ValueError: unknown ``weight_format``.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> model = to_inference(model, "int8", module_filter_fn=lambda mod, fqn: fqn != "2")
        >>> export_report(model).exported, export_report(model).skipped
        (['0'], {'2': 'excluded by module_filter_fn'})
    """
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"to_inference: weight_format={weight_format!r} is invalid; valid: one of {list(WEIGHT_FORMATS)}")
    layer_cls = WEIGHT_FORMATS[weight_format]
    report = ExportReport(weight_format=weight_format)

    def export(mod: nn.Linear, fqn: str) -> nn.Module:
        if module_filter_fn is not None and not module_filter_fn(mod, fqn):
            report.skipped[fqn] = "excluded by module_filter_fn"
            return mod
        new = layer_cls.from_linear(mod)
        report.exported.append(fqn)
        report.bytes_before += _linear_bytes(mod)
        report.bytes_after += sum(b.nbytes for b in new.buffers())
        return new

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            fqn = f"{prefix}.{name}" if prefix else name
            if isinstance(child, nn.Linear):
                setattr(parent, name, export(child, fqn))
            else:
                visit(child, fqn)

    if isinstance(model, nn.Linear):
        model = export(model, "")
    else:
        visit(model, "")
    # object.__setattr__: a plain attribute, not a submodule or state_dict entry
    object.__setattr__(model, _REPORT_ATTR, report)
    return model


def export_report(model: nn.Module) -> ExportReport | None:
    """The report of the last ``to_inference`` on ``model`` (``None`` if never exported)."""
    return getattr(model, _REPORT_ATTR, None)

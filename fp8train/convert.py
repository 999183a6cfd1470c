"""``convert_to_float8_training``: swap ``nn.Linear`` modules for ``Float8Linear`` in place.

The swap keeps parameter objects (an optimizer built before it keeps working) and state_dict keys
for weight and bias. Layers fp8 cannot run well are skipped with the reason recorded; the report
is queryable with ``conversion_report(model)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from fp8train.config import Float8LinearConfig
from fp8train.costmodel import GemmCostModel, for_current_device
from fp8train.linear import Float8Linear
from fp8train.swiglu import Float8SwiGLU, check_swiglu, fusable_config, swiglu_names

__all__ = ["convert_to_float8_training", "conversion_report", "ConversionReport", "ModuleFilter"]

ModuleFilter = Callable[[nn.Module, str], bool]
_REPORT_ATTR = "_fp8train_conversion_report"


@dataclass
class ConversionReport:
    """Which linears were converted, and why the others were not.

    Attributes:
        converted: fully-qualified names of layers now running in fp8.
        skipped: name → human-readable reason.
        config: the config converted layers use.
        fused_swiglu: names of the feed-forwards wrapped as ``Float8SwiGLU`` (``fuse_swiglu``).
    """

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    config: Float8LinearConfig | None = None
    fused_swiglu: list[str] = field(default_factory=list)

    def table(self) -> str:
        """A fixed-width table of every linear layer and what happened to it."""
        rows = [(n, "fp8", "") for n in self.converted] + [(n, "skipped", r) for n, r in self.skipped.items()]
        rows.sort()
        width = max([len("layer")] + [len(r[0]) for r in rows])
        lines = [f"{'layer':<{width}}  {'status':<7}  reason", "-" * (width + 20)]
        lines += [f"{n:<{width}}  {s:<7}  {r}" for n, s, r in rows]
        lines.append(f"{len(self.converted)} converted, {len(self.skipped)} skipped")
        if self.fused_swiglu:
            lines.append(f"{len(self.fused_swiglu)} SwiGLU feed-forwards fused (Float8SwiGLU)")
        return "\n".join(lines)


AutoFilter = bool | GemmCostModel | None


def _skip_reason(
    mod: nn.Linear, fqn: str, module_filter_fn: ModuleFilter | None, cost: GemmCostModel | None
) -> str | None:
    if module_filter_fn is not None and not module_filter_fn(mod, fqn):
        return "excluded by module_filter_fn"
    for name in ("in_features", "out_features"):
        n = getattr(mod, name)
        if n % 16 != 0:
            return f"{name}={n} is not divisible by 16 (fp8 GEMMs need 16-aligned dims)"
    if cost is not None:
        return cost.skip_reason(mod.in_features, mod.out_features)
    return None


def runs_fp8_gemms(config: Float8LinearConfig) -> bool:
    """Whether some GEMM of this recipe runs on fp8 tensor cores (not emulated, not MX, which the
    cost model does not cover): only then does the auto filter have speed to protect."""
    mm = config.linear_mm_config
    emulated = config.emulate or all(g.emulate for g in (mm.output, mm.grad_input, mm.grad_weight))
    return not emulated and not config.has_mx


def resolve_auto_filter(auto_filter: AutoFilter, config: Float8LinearConfig) -> GemmCostModel | None:
    """The cost model the swap filters with, or ``None`` for no automatic filter.

    ``None`` (the default) filters when CUDA is available and the recipe really runs fp8 GEMMs
    (not ``emulate``): there fp8 exists for speed. On CPU, emulated, or with MX block scaling
    (whose GEMMs the model does not cover; emulated on Hopper) fp8 is run for its numerics, and
    every layer is converted.
    """
    if isinstance(auto_filter, GemmCostModel):
        return auto_filter
    if auto_filter is None:
        auto_filter = torch.cuda.is_available() and runs_fp8_gemms(config)
    if not isinstance(auto_filter, bool):
        raise ValueError(f"auto_filter={auto_filter!r} is invalid; valid: None (auto), True, False or a GemmCostModel")
    return for_current_device() if auto_filter else None


def resolve_fuse_swiglu(fuse_swiglu: bool | None, config: Float8LinearConfig) -> bool:
    """Whether the swap wraps SwiGLU feed-forwards as ``Float8SwiGLU``: ``None`` (the default) does
    where fp8 runs for speed (CUDA available, real fp8 GEMMs, as ``resolve_auto_filter``) and the
    recipe's casts can fuse (``fp8train.swiglu.fusable_config``)."""
    if fuse_swiglu is None:
        return torch.cuda.is_available() and runs_fp8_gemms(config) and fusable_config(config)
    if not isinstance(fuse_swiglu, bool):
        raise ValueError(f"fuse_swiglu={fuse_swiglu!r} is invalid; valid: None (auto), True or False")
    return fuse_swiglu


def convert_to_float8_training(
    module: nn.Module,
    *,
    config: Float8LinearConfig | str | None = None,
    module_filter_fn: ModuleFilter | None = None,
    auto_filter: AutoFilter = None,
    fuse_swiglu: bool | None = None,
) -> nn.Module:
    """Replace every eligible ``nn.Linear`` in ``module`` with a ``Float8Linear``, in place.

    Args:
        module: the model (or a single ``nn.Linear``, in which case the new layer is returned).
        config: a ``Float8LinearConfig`` or a recipe name (default: ``"tensorwise"``).
        module_filter_fn: ``(module, fqn) -> bool``; ``False`` keeps that linear in high precision.
            ``fqn`` is the name as in ``named_modules()`` (e.g. ``"layers.0.attention.wq"``).
        auto_filter: keep layers too small for fp8 to pay in high precision, judged by a cost model
            of the GPU (``fp8train.costmodel``): ``None`` (default) does so when CUDA is available
            and ``config.emulate`` is off; ``True``/``False`` force it on/off; a ``GemmCostModel``
            uses that model (e.g. ``H100.replace(tokens=batch * seq_len)``).
        fuse_swiglu: wrap SwiGLU feed-forwards whose three linears all convert (the built-in
            Llama's, and classes given to ``fp8train.register_swiglu``) as ``Float8SwiGLU``, which
            fuses the SwiGLU into the fp8 casts around it (``fp8train.swiglu``), when the recipe's
            casts are tensorwise (``fp8train.swiglu.fusable_config``: ``tensorwise``, ``delayed``).
            ``None`` (default): where CUDA is available and the GEMMs run in fp8 (not ``emulate``);
            ``True``/``False``: always / never. Parameters, state_dict keys and layer names are
            unchanged.

    Returns:
        ``module`` (converted in place). ``conversion_report(module)`` lists converted and
        skipped layers with reasons.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> model = convert_to_float8_training(model, config="tensorwise")
        >>> conversion_report(model).skipped
        {'2': 'out_features=10 is not divisible by 16 (fp8 GEMMs need 16-aligned dims)'}
    """
    if isinstance(config, str) or config is None:
        config = Float8LinearConfig.from_recipe_name(config or "tensorwise")
    if not isinstance(config, Float8LinearConfig):
        raise ValueError(f"config={config!r} is invalid; valid: a Float8LinearConfig or a recipe name")
    cost = resolve_auto_filter(auto_filter, config)
    fuse = resolve_fuse_swiglu(fuse_swiglu, config)
    report = ConversionReport(config=config)

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            fqn = f"{prefix}.{name}" if prefix else name
            if isinstance(child, Float8Linear):
                report.skipped[fqn] = "already a Float8Linear"
            elif isinstance(child, nn.Linear):
                reason = _skip_reason(child, fqn, module_filter_fn, cost)
                if reason is None:
                    setattr(parent, name, Float8Linear.from_float(child, config))
                    report.converted.append(fqn)
                else:
                    report.skipped[fqn] = reason
            else:
                names = swiglu_names(child) if fuse else None
                if names is not None:
                    check_swiglu(child, names)  # before the swap: the check runs no fp8 and records nothing
                visit(child, fqn)
                if (names is not None and fusable_config(config)
                        and all(isinstance(getattr(child, n), Float8Linear) for n in names)):
                    order = tuple(n for n, _ in child.named_children())
                    gate, up, down = (getattr(child, n) for n in names)
                    setattr(parent, name, Float8SwiGLU(gate, up, down, names, order))
                    report.fused_swiglu.append(fqn)

    if isinstance(module, nn.Linear) and not isinstance(module, Float8Linear):
        reason = _skip_reason(module, "", module_filter_fn, cost)
        if reason is not None:
            raise ValueError(f"cannot convert this nn.Linear: {reason}")
        module = Float8Linear.from_float(module, config)
        report.converted.append("")
    else:
        visit(module, "")
    object.__setattr__(module, _REPORT_ATTR, report)
    return module


def conversion_report(module: nn.Module) -> ConversionReport | None:
    """The report of the last ``convert_to_float8_training`` on ``module`` (``None`` if never converted)."""
    return getattr(module, _REPORT_ATTR, None)

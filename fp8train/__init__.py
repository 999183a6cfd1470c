"""fp8train: fp8 mixed-precision training for PyTorch.

    >>> import fp8train
    >>> fp8train.convert_to_float8_training(model, config="delayed",
    ...                                     module_filter_fn=lambda mod, fqn: fqn != "lm_head")
    >>> # once per optimizer step, after backward, with delayed scaling:
    >>> fp8train.sync_float8_amax_and_scale_history(model)
    >>> # once per optimizer step, after it, with FSDP2 and enable_fsdp_float8_all_gather=True:
    >>> fp8train.precompute_float8_dynamic_scale_for_fsdp(model)
"""

from fp8train.config import (
    CastConfig,
    DelayedScalingConfig,
    Float8LinearConfig,
    GemmInputRole,
    LinearMMConfig,
    ScaledMMConfig,
    ScalingGranularity,
    ScalingType,
    recipe_names,
)
from fp8train.costmodel import GemmCostModel
from fp8train.convert import ConversionReport, conversion_report, convert_to_float8_training
from fp8train.delayed import delayed_scales_pending, eager_until_synced, sync_float8_amax_and_scale_history
from fp8train.fsdp import precompute_float8_dynamic_scale_for_fsdp
from fp8train.linear import Float8Linear, set_weight_cast_cache
from fp8train.ops import scaled_mm
from fp8train.scaling import from_float8, to_float8
from fp8train.swiglu import Float8SwiGLU, register_swiglu
from fp8train.tensor import Float8Tensor

__all__ = [
    "CastConfig",
    "ConversionReport",
    "DelayedScalingConfig",
    "Float8Linear",
    "Float8LinearConfig",
    "Float8SwiGLU",
    "Float8Tensor",
    "GemmCostModel",
    "GemmInputRole",
    "LinearMMConfig",
    "ScaledMMConfig",
    "ScalingGranularity",
    "ScalingType",
    "conversion_report",
    "convert_to_float8_training",
    "delayed_scales_pending",
    "eager_until_synced",
    "from_float8",
    "precompute_float8_dynamic_scale_for_fsdp",
    "recipe_names",
    "register_swiglu",
    "scaled_mm",
    "set_weight_cast_cache",
    "sync_float8_amax_and_scale_history",
    "to_float8",
]
__version__ = "0.1.0"

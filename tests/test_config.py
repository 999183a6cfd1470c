import dataclasses

import pytest
import torch

from fp8train import (
    CastConfig,
    DelayedScalingConfig,
    Float8LinearConfig,
    LinearMMConfig,
    ScaledMMConfig,
    ScalingGranularity,
    ScalingType,
    recipe_names,
)


def test_recipes_known_and_distinct():
    assert {"tensorwise", "delayed", "rowwise", "rowwise_with_gw_hp"} <= set(recipe_names())
    cfgs = [Float8LinearConfig.from_recipe_name(n) for n in recipe_names()]
    assert len(set(cfgs)) == len(cfgs)
    for n, c in zip(recipe_names(), cfgs):
        assert c.name == n


def test_delayed_recipe_contents():
    c = Float8LinearConfig.from_recipe_name("delayed")
    assert c.cast_config_input.scaling_type is ScalingType.DELAYED
    assert c.cast_config_input.target_dtype is torch.float8_e4m3fn
    assert c.cast_config_weight.target_dtype is torch.float8_e4m3fn
    assert c.cast_config_grad_output.target_dtype is torch.float8_e5m2
    assert c.delayed_scaling.history_len == 16 and c.delayed_scaling.amax_compute_algo == "max"


def test_rowwise_recipes():
    r = Float8LinearConfig.from_recipe_name("rowwise")
    assert r.cast_config_input.scaling_granularity is ScalingGranularity.AXISWISE
    assert r.round_scales_to_power_of_2
    hp = Float8LinearConfig.from_recipe_name("rowwise_with_gw_hp")
    assert not hp.input_for_grad_weight.enabled and not hp.grad_output_for_grad_weight.enabled
    assert hp.weight_for_grad_input.enabled


def test_default_gemm_configs_fast_accum_only_for_output():
    mm = Float8LinearConfig().linear_mm_config
    assert mm.output.use_fast_accum and not mm.grad_input.use_fast_accum and not mm.grad_weight.use_fast_accum


def test_global_emulate_and_pad_apply_to_every_gemm():
    mm = Float8LinearConfig(emulate=True, pad_inner_dim=True).linear_mm_config
    assert all(g.emulate and g.pad_inner_dim for g in (mm.output, mm.grad_input, mm.grad_weight))


def test_unknown_recipe_lists_known():
    with pytest.raises(ValueError, match="known recipes: .*tensorwise.*delayed"):
        Float8LinearConfig.from_recipe_name("fastest")


def test_recipe_override_unknown_field():
    with pytest.raises(ValueError, match="no field"):
        Float8LinearConfig.from_recipe_name("tensorwise", emulat=True)


def test_string_values_coerced():
    c = CastConfig("delayed", "tensorwise", "e5m2")
    assert c.scaling_type is ScalingType.DELAYED and c.target_dtype is torch.float8_e5m2


@pytest.mark.parametrize(
    "build, field_name",
    [
        (lambda: CastConfig(scaling_type="sometimes"), "scaling_type"),
        (lambda: CastConfig(scaling_granularity="blockwise"), "scaling_granularity"),
        (lambda: CastConfig(target_dtype="e3m4"), "target_dtype"),
        (lambda: CastConfig(target_dtype=torch.float16), "target_dtype"),
        (lambda: DelayedScalingConfig(history_len=0), "history_len"),
        (lambda: DelayedScalingConfig(history_len=2.5), "history_len"),
        (lambda: DelayedScalingConfig(amax_compute_algo="mean"), "amax_compute_algo"),
        (lambda: DelayedScalingConfig(margin=-1), "margin"),
        (lambda: ScaledMMConfig(emulate="yes"), "emulate"),
        (lambda: ScaledMMConfig(use_fast_accum=1), "use_fast_accum"),
        (lambda: LinearMMConfig(output=None), "output"),
        (lambda: Float8LinearConfig(cast_config_input="dynamic"), "cast_config_input"),
        (lambda: Float8LinearConfig(emulate=None), "emulate"),
        (lambda: Float8LinearConfig(gemm_config_output=3), "gemm_config_output"),
        (lambda: Float8LinearConfig(delayed_scaling=16), "delayed_scaling"),
        (lambda: Float8LinearConfig(cast_config_input_for_grad_weight=CastConfig("delayed")),
         "cast_config_input_for_grad_weight"),
    ],
)
def test_bad_values_name_field_and_choices(build, field_name):
    with pytest.raises(ValueError, match=field_name) as e:
        build()
    assert "valid" in str(e.value)


def test_delayed_axiswise_rejected_at_construction():
    with pytest.raises(ValueError, match="delayed.*axiswise"):
        CastConfig(ScalingType.DELAYED, ScalingGranularity.AXISWISE)


def test_gemm_mixing_fp8_and_hp_rejected():
    with pytest.raises(ValueError, match="grad_weight GEMM"):
        Float8LinearConfig(cast_config_input_for_grad_weight=CastConfig("disabled"))


def test_fsdp_all_gather_needs_tensorwise_weight():
    with pytest.raises(ValueError, match="enable_fsdp_float8_all_gather"):
        Float8LinearConfig.from_recipe_name("rowwise", enable_fsdp_float8_all_gather=True)


def test_frozen_and_dict_round_trip():
    c = Float8LinearConfig.from_recipe_name("delayed")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.emulate = True  # type: ignore[misc]
    d = c.to_dict()
    assert d["cast_config_grad_output"]["target_dtype"] == "e5m2"
    assert Float8LinearConfig.from_dict(d) == c

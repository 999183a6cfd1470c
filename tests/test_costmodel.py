"""The cost model behind the auto filter, and the filter in the swap and the callback."""

import pytest
import torch.nn as nn

import fp8train
from fp8train.costmodel import H100, GemmCostModel


def test_h100_model_matches_measured_shapes():
    # measured on the H100 (docs/BENCHMARKS.md, back to back, M=16384): 1024x1024 loses, 8192x8192 wins
    assert H100.predicted_speedup(1024, 1024) < 1.0
    assert H100.predicted_speedup(4096, 4096) > 1.2
    assert H100.predicted_speedup(8192, 8192) > H100.predicted_speedup(4096, 4096)
    # the saving grows with K*N, the cast cost with K+N: larger layers always predict better
    assert H100.predicted_speedup(4096, 14336) > H100.predicted_speedup(2048, 8192)
    bf16, fp8 = H100.step_seconds(4096, 4096, tokens=16384)
    assert bf16 == pytest.approx(6 * 16384 * 4096 * 4096 / H100.bf16_flops)
    assert fp8 > bf16 / H100.gemm_speedup


def test_skip_reason_names_shape_and_escape_hatch():
    assert H100.skip_reason(8192, 8192) is None
    reason = H100.skip_reason(1024, 1024)
    assert "1024x1024" in reason and "auto_filter=False" in reason and "H100" in reason


@pytest.mark.parametrize("field,value", [("bf16_flops", 0), ("gemm_speedup", -1.0), ("tokens", True),
                                         ("s_fixed", -1e-6), ("min_speedup", "fast"), ("tensor_parallel", 0),
                                         ("tensor_parallel", 2.0)])
def test_bad_cost_model_fields_fail_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"GemmCostModel.{field}="):
        H100.replace(**{field: value})


def _mlp():
    return nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 8192), nn.ReLU(), nn.Linear(8192, 8192))


def test_auto_filter_keeps_small_layers_in_high_precision():
    m = fp8train.convert_to_float8_training(_mlp(), config="tensorwise", auto_filter=True)
    report = fp8train.conversion_report(m)
    assert isinstance(m[0], nn.Linear) and not isinstance(m[0], fp8train.Float8Linear)
    assert isinstance(m[4], fp8train.Float8Linear)
    assert "auto filter" in report.skipped["0"] and "4" in report.converted


def test_auto_filter_default_is_off_without_cuda_and_can_be_forced_off():
    m = fp8train.convert_to_float8_training(nn.Sequential(nn.Linear(64, 64)), config="tensorwise")
    assert isinstance(m[0], fp8train.Float8Linear)  # CPU: fp8 runs for its numerics, nothing filtered
    m = fp8train.convert_to_float8_training(_mlp(), config="tensorwise", auto_filter=False)
    assert all(isinstance(m[i], fp8train.Float8Linear) for i in (0, 2, 4))


def test_auto_filter_with_a_custom_model():
    never = GemmCostModel("slow-cast GPU", 1e15, 1.8, 1e-9, 0.0, 0.0)
    m = fp8train.convert_to_float8_training(_mlp(), config="tensorwise", auto_filter=never)
    assert not any(isinstance(x, fp8train.Float8Linear) for x in m)
    assert "slow-cast GPU" in fp8train.conversion_report(m).skipped["4"]


def test_bad_auto_filter_value_fails_early():
    with pytest.raises(ValueError, match="auto_filter='yes'"):
        fp8train.convert_to_float8_training(_mlp(), auto_filter="yes")
    from fp8train.lightning import Float8Training

    with pytest.raises(ValueError, match=r"Float8Training\(auto_filter=1\)"):
        Float8Training(auto_filter=1)


def test_auto_filter_is_off_for_recipes_without_real_fp8_gemms():
    from fp8train.config import ScaledMMConfig
    from fp8train.convert import runs_fp8_gemms

    cfg = fp8train.Float8LinearConfig.from_recipe_name
    assert runs_fp8_gemms(cfg("tensorwise")) and runs_fp8_gemms(cfg("delayed"))
    assert not runs_fp8_gemms(cfg("tensorwise", emulate=True)) and not runs_fp8_gemms(cfg("mxfp8"))
    emu = ScaledMMConfig(emulate=True)
    assert not runs_fp8_gemms(cfg("tensorwise", gemm_config_output=emu, gemm_config_grad_input=emu,
                                  gemm_config_grad_weight=emu))
    assert runs_fp8_gemms(cfg("tensorwise", gemm_config_grad_weight=emu))  # two GEMMs still real


def test_auto_filter_on_the_built_in_llamas():
    """The decisions behind docs/BENCHMARKS.md: at 16384 tokens per step every linear of the 1.2B
    model but lm_head runs in fp8 (the 2048x2048 projections, predicted 1.11x, measured to pay inside
    the compiled model); every linear of the 125M model stays bf16 (predicted <= 0.83x)."""
    import torch

    from fp8train.models.llama import Llama, LlamaConfig

    def converted(name: str) -> tuple[int, int]:
        with torch.device("meta"):
            model = Llama(LlamaConfig.from_name(name))
        fp8train.convert_to_float8_training(model, config="tensorwise", auto_filter=H100.replace(tokens=16384),
                                            module_filter_fn=lambda m, fqn: fqn != "lm_head")
        report = fp8train.conversion_report(model)
        return len(report.converted), len(report.skipped)

    assert H100.min_speedup < H100.predicted_speedup(2048, 2048, tokens=16384) < 1.15
    assert converted("llama_1b") == (112, 1)
    assert converted("llama_125m")[0] == 0


def test_tensor_parallel_judges_the_shard_each_rank_multiplies():
    """Under TP each rank runs its shard's GEMMs: the larger dimension split (column-wise up-, row-wise
    down-projections). llama_1b at TP=2: the 2048x2048 projections (2048x1024 shards, 0.93x) stay
    bf16, the SwiGLU linears (2048x4096 / 4096x2048 shards, 1.24x) convert."""
    import torch

    from fp8train.models.llama import Llama, LlamaConfig

    tp2 = H100.replace(tensor_parallel=2)
    assert tp2.predicted_speedup(2048, 8192) == pytest.approx(H100.predicted_speedup(2048, 4096))
    assert tp2.predicted_speedup(8192, 2048) == pytest.approx(H100.predicted_speedup(4096, 2048))
    assert tp2.predicted_speedup(2048, 2048) == pytest.approx(H100.predicted_speedup(2048, 1024))
    assert tp2.predicted_speedup(2048, 2048) < tp2.min_speedup
    assert "split over 2 tensor-parallel ranks" in tp2.skip_reason(2048, 2048)
    with torch.device("meta"):
        model = Llama(LlamaConfig.from_name("llama_1b"))
    fp8train.convert_to_float8_training(model, config="tensorwise", auto_filter=tp2,
                                        module_filter_fn=lambda m, fqn: fqn != "lm_head")
    converted = fp8train.conversion_report(model).converted
    assert len(converted) == 48 and all("feed_forward" in name for name in converted)


def test_callback_reads_the_tensor_parallel_size_of_its_strategy():
    from types import SimpleNamespace

    from fp8train.lightning import _tensor_parallel_size

    class Mesh:
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name):
            return SimpleNamespace(size=lambda: {"data_parallel": 4, "tensor_parallel": 2}[name])

    class NotYet:
        @property
        def device_mesh(self):
            raise RuntimeError("Accessing the device mesh before processes have initialized is not allowed.")

    assert _tensor_parallel_size(SimpleNamespace(strategy=SimpleNamespace(device_mesh=Mesh()))) == 2
    assert _tensor_parallel_size(SimpleNamespace(strategy=NotYet())) == 1
    assert _tensor_parallel_size(SimpleNamespace(strategy=SimpleNamespace())) == 1  # DDP, single device
    assert _tensor_parallel_size(None) == 1

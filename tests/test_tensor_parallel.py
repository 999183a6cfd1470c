"""Tensor parallelism for the built-in Llama: ``apply_tensor_parallel`` and ``trainer=fsdp2`` with
``trainer.strategy.tensor_parallel_size``, on CPU ranks (gloo).

Measured on torch 2.13 CPU, 2 ranks (tolerances below leave headroom):

* ``apply_tensor_parallel`` vs the same model in one process, 3 AdamW steps at lr 1e-2
  (llama_tiny with 2 layers, 4 query / 2 kv heads): fp32 (no fp8) losses within 4.2e-7 relative
  and first-step gradients within 6.3e-7 of the largest entry (reduction order only); tensorwise
  fp8 (with wv and w3 left in high precision) losses within 0.064%, gradients as close to the
  fp32 model's as single-process fp8's within 0.79 dB of SQNR; delayed within 0.11% and 1.31 dB.
  Dynamic scaling scales each rank's shard, so fp8 is not bit-exact.
* the Hydra app, 3 steps, TP=2 x DP=1 vs TP=1 x DP=2 on the same global batch and validation
  windows, both initialised alike (``materialize`` cuts CPU shards from one whole-model init):
  fp8 off, train losses identical and validation losses within 1e-7; tensorwise within 9.3e-5
  (train, mean of the last steps) and 5.9e-5 (validation after the last step).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _helpers import sqnr
from fp8train.models.llama import LlamaConfig
from fp8train.train import ConfigError, FSDP2Strategy, build
from fp8train.train.parallel import check_tensor_parallel

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
SCRIPT = Path(__file__).parent / "scripts" / "llama_tp.py"
FP32_TOLERANCE = 1e-5  # measured 4.2e-7 (losses), 6.3e-7 (gradients)
FP8_LOSS_TOLERANCE = 0.005  # measured 0.00064 (tensorwise), 0.0011 (delayed)
GRAD_SQNR_GAP_DB = 4.0  # measured <= 1.31 dB
APP_TOLERANCE = 1e-3  # measured 9.3e-5 (train), 5.9e-5 (validation)

TINY = ["+recipe=llama_tiny_cpu_smoke", "trainer.max_steps=3", "trainer.val_check_interval=3",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]


def _env() -> dict[str, str]:
    inherited = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in inherited and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="0")
    return env


def _torchrun(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --- (a) the plan on two ranks vs one process --------------------------------------------------
@pytest.mark.slow
def test_apply_tensor_parallel_matches_single_process(tmp_path):
    _torchrun([str(SCRIPT), str(tmp_path)])
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    r0, r1 = ranks

    fp32 = r0["fp32"]
    assert max(_rel(a, b) for a, b in zip(fp32["losses"], fp32["reference"])) < FP32_TOLERANCE
    for name, ref in fp32["reference_grads"].items():
        err = (fp32["grads"][name] - ref).abs().max() / ref.abs().max()
        assert err < FP32_TOLERANCE, (name, float(err))
    # colwise shards the output features, rowwise the input features; this rank holds 2 of 4 heads
    assert fp32["placements"] == {"wq": "(Shard(dim=0),)", "wo": "(Shard(dim=1),)"}
    assert fp32["local_wq_shape"] == (64, 128)
    assert fp32["replicated_type"] == "Parameter"  # lm_head, norms, embedding: not split

    hp_grads = fp32["reference_grads"]
    for case in ("tensorwise", "delayed"):
        r = r0[case]
        assert max(_rel(a, b) for a, b in zip(r["losses"], r["reference"])) < FP8_LOSS_TOLERANCE, (case, r)
        gaps = {n: sqnr(r["reference_grads"][n], hp_grads[n]) - sqnr(g, hp_grads[n]) for n, g in r["grads"].items()}
        assert max(gaps.values()) < GRAD_SQNR_GAP_DB, (case, gaps)
    # layers the filter left in high precision are split too, with PyTorch's styles
    assert r0["tensorwise"]["types"] == {"wq": "Float8Linear", "wk": "Float8Linear", "wv": "Linear",
                                         "wo": "Float8Linear", "w1": "Float8Linear", "w2": "Float8Linear",
                                         "w3": "Linear"}
    # delayed: every rank ends with the whole tensors' scales (plain tensors) and the same weights
    assert len(r0["delayed"]["fp8"]) == 2 * 7 * 12
    assert all(type(v) is torch.Tensor for v in r0["delayed"]["fp8"].values())
    for case in ("fp32", "tensorwise", "delayed"):
        assert r0[case]["fp8"].keys() == r1[case]["fp8"].keys()
        assert all(torch.equal(v, r1[case]["fp8"][k]) for k, v in r0[case]["fp8"].items()), case
        assert all(torch.equal(v, r1[case]["weights"][k]) for k, v in r0[case]["weights"].items()), case

    errors = r0["errors"]
    assert "LlamaConfig.n_heads=1" in errors["n_heads"] and "tensor-parallel size 2" in errors["n_heads"]
    assert "LlamaConfig.n_kv_heads=1" in errors["n_kv_heads"] and "a multiple of 2" in errors["n_kv_heads"]
    assert "fuse_projections=True" in errors["fuse_projections"] and "valid: False" in errors["fuse_projections"]
    assert "a 1-D mesh" in errors["2-D mesh"]


# --- (b) the Hydra app end to end -------------------------------------------------------------
def _app_run(tmp_path: Path, tp: int, fp8: str) -> dict:
    # the same global batch (4 sequences) and validation windows (4) for both layouts: TP peers
    # share a batch, so TP=2 x DP=1 takes 4 per rank where TP=1 x DP=2 takes 2
    run_dir = tmp_path / f"{fp8}_tp{tp}"
    batch, val_batches = (4, 1) if tp == 2 else (2, 2)
    _torchrun([str(TRAIN), "trainer=fsdp2", "trainer.accelerator=cpu", f"trainer.strategy.tensor_parallel_size={tp}",
               f"fp8={fp8}", f"data.batch_size={batch}", f"data.val_batches={val_batches}", f"hydra.run.dir={run_dir}",
               *TINY], timeout=180)
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_app_tensor_parallel_two_cpu_ranks_matches_tp1(tmp_path):
    tp2 = _app_run(tmp_path, 2, "tensorwise")
    tp1 = _app_run(tmp_path, 1, "tensorwise")
    assert tp2["world_size"] == 2 and tp2["steps"] == 3 and tp2["fp8_layers"] == 14
    assert tp2["tokens"] == tp1["tokens"] == 3 * 4 * 64  # TP peers' tokens counted once
    for key in ("train_loss", "val_loss"):
        assert math.isfinite(tp2[key]) and _rel(tp2[key], tp1[key]) < APP_TOLERANCE, (key, tp2[key], tp1[key])


# --- (c) bad settings ----------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -2, True, 1.5, "2"])
def test_strategy_rejects_a_tensor_parallel_size_that_is_not_a_positive_int(value):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=.*valid: a positive integer dividing the world size"):
        FSDP2Strategy(tensor_parallel_size=value)


def test_strategy_checks_sizes_against_the_world_size():
    FSDP2Strategy(tensor_parallel_size=2).check_world_size(4)
    FSDP2Strategy(data_parallel_size=2, tensor_parallel_size=2).check_world_size(4)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3\) is invalid for a world size of 4; .*\[1, 2, 4\]"):
        FSDP2Strategy(tensor_parallel_size=3).check_world_size(4)
    with pytest.raises(ValueError, match=r"data_parallel_size=4\) is invalid with tensor_parallel_size=2 .* 'auto' or 2"):
        FSDP2Strategy(data_parallel_size=4, tensor_parallel_size=2).check_world_size(4)


@pytest.mark.parametrize(
    "fields, words",
    [({"n_heads": 2, "n_kv_heads": 2, "dim": 64}, ["LlamaConfig.n_heads=2", "tensor-parallel size 4", "a multiple of 4"]),
     ({"n_kv_heads": 2}, ["LlamaConfig.n_kv_heads=2", "tensor-parallel size 4"]),
     ({"fuse_projections": True}, ["LlamaConfig.fuse_projections=True", "valid: False"])],
)
def test_check_tensor_parallel_names_field_value_and_size(fields, words):
    cfg = LlamaConfig.from_name("llama_tiny", **fields)
    with pytest.raises(ValueError) as info:
        check_tensor_parallel(cfg, 4)
    for w in words:
        assert w in str(info.value)
    check_tensor_parallel(cfg, 1)  # no tensor parallelism: anything goes


@pytest.mark.parametrize(
    "overrides, words",
    [(["trainer.strategy.tensor_parallel_size=3"], ["trainer.strategy", "tensor_parallel_size=3", "[1, 2]"]),
     (["trainer.strategy.tensor_parallel_size=2", "trainer.strategy.data_parallel_size=2"],
      ["data_parallel_size=2", "'auto' or 1"]),
     (["trainer.strategy.tensor_parallel_size=2", "model.n_kv_heads=1"],
      ["trainer.strategy.tensor_parallel_size=2", "LlamaConfig.n_kv_heads=1"]),
     (["trainer.strategy.tensor_parallel_size=2", "model.fuse_projections=true"], ["fuse_projections=True"]),
     (["trainer.strategy.tensor_parallel_size=2", "optim.fp8_reduce_scatter=true"],
      ["optim.fp8_reduce_scatter", "tensor_parallel_size=2"])],
)
def test_app_rejects_bad_tensor_parallel_settings_before_training(overrides, words):
    from test_train_app import _compose

    cfg = _compose(TINY + ["trainer=fsdp2", "trainer.accelerator=cpu", "trainer.devices=2", *overrides])
    with pytest.raises(ConfigError) as info:
        build(cfg)
    for w in words:
        assert w in str(info.value), str(info.value)

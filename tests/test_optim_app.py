"""``optim=adamw_fp8`` (and ``optim.fp8_reduce_scatter``) in the Hydra app: composition,
validation, and end-to-end CPU runs of ``scripts/train.py`` (one process, and FSDP2 on 2 ranks)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from test_train_app import ROOT, TINY, TRAIN, _compose, _train

from fp8train.blockwise import E4M3
from fp8train.optim import AdamWFp8
from fp8train.reduce_scatter import fp8_reduce_scatter_supported
from fp8train.train import ConfigError, LlamaLightningModule, OptimConfig
from fp8train.train.app import build
from fp8train.models.llama import LlamaConfig


def test_adamw_fp8_option_composes_to_a_validated_config():
    cfg = _compose(["optim=adamw_fp8", "optim.lr=3e-3"])
    o = OptimConfig(**OmegaConf.to_container(cfg.optim, resolve=True))
    assert o.name == "adamw_fp8" and o.lr == 3e-3 and o.second_moment == "bf16" and o.block_size == 128
    assert o.betas == (0.9, 0.95) and o.warmup_steps == 100  # the adamw option's values
    assert OptimConfig(**OmegaConf.to_container(_compose([]).optim, resolve=True)).name == "adamw"
    assert _compose(["optim=adamw_fp8", "model.compile=true"]).optim.compile is True  # follows the model


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"name": "adam8bit"}, ["OptimConfig.name='adam8bit'", "adamw_fp8"]),
        ({"second_moment": "fp16"}, ["OptimConfig.second_moment='fp16'", "bf16"]),
        ({"block_size": 0}, ["OptimConfig.block_size=0"]),
        ({"fp8_reduce_scatter": "yes"}, ["OptimConfig.fp8_reduce_scatter='yes'"]),
        ({"fused": "auto"}, ["OptimConfig.fused='auto'", "null (auto), true or false"]),
    ],
)
def test_optim_config_errors_name_the_field(kwargs, words):
    with pytest.raises(ValueError) as info:
        OptimConfig(**kwargs)
    for w in words:
        assert w in str(info.value)


def test_configure_optimizers_builds_adamw_fp8():
    module = LlamaLightningModule(LlamaConfig.from_name("llama_tiny", n_layers=1),
                                  OptimConfig(name="adamw_fp8", second_moment="fp8", block_size=64))
    module.configure_model()

    class _Trainer:  # configure_optimizers reads the run length only
        estimated_stepping_batches = 10

    module.trainer = _Trainer()  # type: ignore[assignment]
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, AdamWFp8)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["second_moment"] == "fp8" and g["block_size"] == 64 for g in opt.param_groups)


def test_fp8_reduce_scatter_without_fsdp2_fails_before_training(tmp_path):
    cfg = _compose(TINY + ["optim.fp8_reduce_scatter=true", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"optim.fp8_reduce_scatter=true needs FSDP2 \(trainer=fsdp2\)"):
        build(cfg)


@pytest.mark.slow
def test_train_with_adamw_fp8_end_to_end(tmp_path):
    proc = _train(TINY + ["optim=adamw_fp8", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["steps"] == 3 and math.isfinite(s["train_loss"]) and math.isfinite(s["val_loss"])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["hyper_parameters"]["optim"]["name"] == "adamw_fp8"
    dtypes = {str(t.dtype) for st in ckpt["optimizer_states"][0]["state"].values() for k, t in st.items()
              if k == "exp_avg"}
    assert dtypes == {str(E4M3), "torch.float32"}  # matrices in fp8, norm weights in fp32


@pytest.mark.slow
@pytest.mark.skipif(not fp8_reduce_scatter_supported(), reason="needs torch >= 2.9")
def test_fsdp2_two_cpu_ranks_with_fp8_states_and_reduce_scatter(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAIN),
           "trainer=fsdp2", "trainer.accelerator=cpu", "optim=adamw_fp8", "optim.fp8_reduce_scatter=true",
           f"hydra.run.dir={tmp_path}"] + TINY
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == 3 and math.isfinite(s["val_loss"])
    # Lightning saved the sharded optimizer state through torch.distributed.checkpoint ...
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir()
    # ... and a run resumes from it (AdamWFp8.load_state_dict through set_optimizer_state_dict)
    resumed = tmp_path / "resumed"
    cmd = [c for c in cmd if not c.startswith(("hydra.run.dir=", "trainer.max_steps="))]
    proc = subprocess.run(cmd + [f"hydra.run.dir={resumed}", f"ckpt_path={ckpt}", "trainer.max_steps=5"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Restored all states" in proc.stdout + proc.stderr
    s = json.loads((resumed / "summary.json").read_text())
    assert s["steps"] == 5 and math.isfinite(s["val_loss"])

"""The Hydra training app: config groups, typed validation, end-to-end runs on CPU, sweeps, DDP.

End-to-end tests run ``scripts/train.py`` in a subprocess, as a user would, for a few steps of a
2-layer llama_tiny (``+recipe=llama_tiny_cpu_smoke``), with run dirs under pytest's tmp_path.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

from fp8train import Float8LinearConfig, recipe_names
from fp8train.models.llama import LlamaConfig
from fp8train.train import ConfigError, OptimConfig, RunSummary, lr_lambda, register_configs
from fp8train.train.app import _uses_fsdp2, fp8_config, model_config
from fp8train.train.schema import Fp8Recipe

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RECIPES = ROOT / "recipes"
TRAIN = ROOT / "scripts" / "train.py"

# a few steps of a 2-layer model with short sequences: a run takes ~1 s after ~3 s of imports
TINY = [
    "+recipe=llama_tiny_cpu_smoke",
    "trainer.max_steps=3",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "data.batch_size=2",
    "data.val_batches=1",
]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _compose(overrides: list[str]):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides + ["paths.output_dir=/tmp/unused"])


def _run(args: list[str], timeout: int = 240, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def _train(overrides: list[str], **kw) -> subprocess.CompletedProcess:
    return _run([str(TRAIN), *overrides], **kw)


def _rows(metrics: Path) -> list[dict[str, str]]:
    with metrics.open(newline="") as f:
        return list(csv.DictReader(f))


# --- config groups -----------------------------------------------------------------------------
def test_fp8_options_are_exactly_bf16_and_the_recipe_registry():
    # the CLI never offers a recipe the code rejects, and offers every recipe it has
    assert set(_options("fp8")) == {"bf16"} | set(recipe_names())
    for name in recipe_names():
        assert OmegaConf.load(CONFIGS / "fp8" / f"{name}.yaml").recipe == name
    assert OmegaConf.load(CONFIGS / "fp8" / "bf16.yaml").recipe is None
    assert [m.value for m in Fp8Recipe] == recipe_names()


def test_model_options_are_llama_presets():
    assert set(_options("model")) == set(LlamaConfig.names())
    for name in _options("model"):
        assert OmegaConf.load(CONFIGS / "model" / f"{name}.yaml").name == name


def test_group_options_present():
    assert {"embedded", "tokens"} <= set(_options("data"))
    assert {"default", "cpu", "gpu", "ddp", "fsdp2"} <= set(_options("trainer"))
    assert {"csv", "tensorboard", "wandb"} <= set(_options("logger"))
    assert {"llama_1b_1xh100", "llama_125m_parity", "llama_tiny_cpu_smoke"} <= {p.stem for p in RECIPES.glob("*.yaml")}


def _all_options() -> list[str]:
    out = [f"{g}={o}" for g in ("model", "data", "fp8", "trainer", "logger") for o in _options(g)]
    return out + [f"+recipe={p.stem}" for p in sorted(RECIPES.glob("*.yaml"))] + ["logger=[csv,tensorboard,wandb]"]


@pytest.mark.parametrize("override", _all_options())
def test_every_option_composes_and_validates(override):
    cfg = _compose([override])
    OmegaConf.resolve(cfg)  # every interpolation resolves (e.g. trainer.precision's resolver)
    model = model_config(cfg)  # -> LlamaConfig (validated)
    assert isinstance(model, LlamaConfig)
    fp8 = fp8_config(cfg, cpu=True)
    assert (fp8 is None) == (cfg.fp8.recipe is None)
    OptimConfig(**OmegaConf.to_container(cfg.optim))
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.trainer.precision in ("32-true", "bf16-mixed")
    if override == "logger=wandb":
        assert cfg.logger.wandb.offline is True


def test_default_config():
    cfg = _compose([])
    assert cfg.model.name == "llama_tiny"
    assert cfg.data.path == "embedded"
    assert cfg.fp8.recipe == "tensorwise" and list(cfg.fp8.skip) == ["lm_head"]
    assert cfg.trainer.accelerator == "auto" and cfg.trainer.max_steps == 300
    assert set(cfg.logger) == {"csv"}


def test_recipe_overlays_and_command_line_wins():
    cfg = _compose(["+recipe=llama_125m_parity"])
    assert cfg.model.name == "llama_125m" and cfg.trainer.max_steps >= 2000
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    cfg = _compose(["+recipe=llama_125m_parity", "fp8=bf16", "trainer.max_steps=10"])
    assert cfg.fp8.recipe is None and cfg.trainer.max_steps == 10
    cfg = _compose(["+recipe=llama_1b_1xh100"])
    assert cfg.model.name == "llama_1b" and cfg.model.compile is True


def test_recipes_are_global_overlays():
    for path in RECIPES.glob("*.yaml"):
        assert path.read_text().startswith("# @package _global_\n"), path


def test_fp8_overrides_reach_float8_linear_config():
    cfg = _compose(["fp8=delayed", "fp8.overrides.emulate=false", "fp8.overrides.pad_inner_dim=true",
                    "fp8.overrides.delayed_scaling={history_len: 4}"])
    got = fp8_config(cfg, cpu=True)
    want = Float8LinearConfig.from_recipe_name("delayed", pad_inner_dim=True, delayed_scaling={"history_len": 4})
    assert got == want  # emulate=false given explicitly is kept on CPU
    assert fp8_config(_compose(["fp8.overrides.cast_kernel=torch"]), cpu=False).cast_kernel == "torch"
    assert fp8_config(_compose(["fp8=rowwise"]), cpu=True).emulate is True  # CPU default
    assert fp8_config(_compose(["fp8=rowwise"]), cpu=False).emulate is False


def test_fsdp2_all_gathers_tensorwise_weights_in_fp8_by_default():
    """trainer=fsdp2: fp8 all-gather on for recipes with tensorwise weight casts (bit-identical and
    faster), off where the config rejects it (axiswise, MX weights) and wherever the user said so."""
    fsdp2 = _compose(["trainer=fsdp2"])
    assert _uses_fsdp2(fsdp2.trainer) and not _uses_fsdp2(_compose([]).trainer)
    assert not _uses_fsdp2(_compose(["trainer=ddp"]).trainer)
    for recipe in ("tensorwise", "delayed"):
        cfg = _compose(["trainer=fsdp2", f"fp8={recipe}"])
        assert fp8_config(cfg, cpu=True, fsdp2=True).enable_fsdp_float8_all_gather is True
        assert fp8_config(cfg, cpu=True, fsdp2=False).enable_fsdp_float8_all_gather is False
        off = _compose(["trainer=fsdp2", f"fp8={recipe}", "fp8.overrides.enable_fsdp_float8_all_gather=false"])
        assert fp8_config(off, cpu=True, fsdp2=True).enable_fsdp_float8_all_gather is False
    for recipe in ("rowwise", "rowwise_with_gw_hp", "mxfp8"):
        cfg = _compose(["trainer=fsdp2", f"fp8={recipe}"])
        assert fp8_config(cfg, cpu=True, fsdp2=True).enable_fsdp_float8_all_gather is False
    # grad_input casting the weight differently would round it twice from the gathered fp8 copy
    e5 = _compose(["trainer=fsdp2", "fp8=tensorwise",
                   "fp8.overrides.cast_config_weight_for_grad_input={target_dtype: e5m2}"])
    assert fp8_config(e5, cpu=True, fsdp2=True).enable_fsdp_float8_all_gather is False
    with pytest.raises(ConfigError, match="enable_fsdp_float8_all_gather"):  # asked for where it cannot work
        fp8_config(_compose(["fp8=rowwise", "fp8.overrides.enable_fsdp_float8_all_gather=true"]), cpu=True,
                   fsdp2=True)


def test_fp8_auto_filter_reaches_the_callback():
    from fp8train.train.app import _fp8_callback

    config = Float8LinearConfig.from_recipe_name("tensorwise")
    assert _fp8_callback(_compose([]), config).auto_filter is None  # default: on iff training on CUDA
    assert _fp8_callback(_compose(["fp8.auto_filter=false"]), config).auto_filter is False
    with pytest.raises(Exception, match="fp8.auto_filter"):
        _compose(["fp8.auto_filter=sometimes"])


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.dim=abc", ["model.dim", "Integer"]),
        ("trainer.max_stepz=3", ["trainer.max_stepz", "TrainerConf"]),
        ("fp8.overrides.emulat=true", ["fp8.overrides.emulat", "Fp8Overrides"]),
        ("fp8.recipe=fastest", ["fastest", "tensorwise", "rowwise_with_gw_hp"]),
        ("optim.lr=fast", ["optim.lr"]),
    ],
)
def test_typed_schema_rejects_while_composing(override, words):
    with pytest.raises(ConfigCompositionException) as info:
        _compose([override])
    text = str(info.value) + str(info.value.__cause__)
    assert isinstance(info.value.__cause__, OmegaConfBaseException), text
    for w in words:
        assert w in text


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["model.name=llama_huge"], ["llama_huge", "llama_tiny"]),
        (["model.n_heads=3"], ["n_heads"]),
        (["fp8=delayed", "fp8.overrides.delayed_scaling={history_len: 0}"], ["history_len"]),
        (["fp8=rowwise", "fp8.overrides.cast_config_input={bogus: 1}"], ["fp8.overrides", "bogus"]),
        (["fp8.overrides.cast_kernel=cuda"], ["cast_kernel", "'cuda'", "'auto', 'triton', 'torch'"]),
        # `+key=` opens the schema for a new key: the package's dataclasses still reject it
        (["+model.dimm=64"], ["dimm", "LlamaConfig"]),
        (["+fp8.overrides.emulat=true"], ["emulat", "Float8LinearConfig"]),
    ],
)
def test_package_dataclasses_validate_values(overrides, words):
    cfg = _compose(overrides)
    with pytest.raises(ConfigError) as info:
        model_config(cfg)
        fp8_config(cfg, cpu=True)
    for w in words:
        assert w in str(info.value)


# --- optimizer schedule and summary ------------------------------------------------------------
def test_lr_schedule_warmup_then_cosine_to_min():
    f = [lr_lambda(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_lambda(110, 10, 110, 0.1) == pytest.approx(0.1)


def test_optim_config_errors_name_field():
    with pytest.raises(ValueError, match="OptimConfig.betas"):
        OptimConfig(betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="OptimConfig.warmup_steps"):
        OptimConfig(warmup_steps=-1)


def test_summary_fits_one_screen(tmp_path):
    s = RunSummary(model="llama_tiny", params=900_000, fp8_recipe="delayed", fp8_emulated=True, fp8_layers=28,
                   fp8_skipped=["model.lm_head"], steps=300, tokens=614400, train_loss=1.8, val_loss=float("nan"))
    text = s.format()
    assert len(text.splitlines()) <= 20 and max(map(len, text.splitlines())) <= 100
    assert "28 layers in fp8" in text and "n/a" in text
    s.write(tmp_path / "summary.json")
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["val_loss"] is None and data["fp8_layers"] == 28 and data["version"] == 1
    assert RunSummary.read(tmp_path / "summary.json").fp8_recipe == "delayed"


# --- end to end (subprocess) -------------------------------------------------------------------
@pytest.mark.slow
def test_train_end_to_end_for_every_fp8_option(tmp_path):
    # one Hydra sweep over every fp8 option: one process, so the ~9 s of imports are paid once;
    # activation checkpointing on for all of them (it must work with every recipe)
    options = _options("fp8")
    proc = _train(["-m", f"fp8={','.join(options)}", "model.activation_checkpointing=true",
                   f"hydra.sweep.dir={tmp_path}"] + TINY, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("run summary") == len(options)
    for job, fp8 in enumerate(options):
        run = tmp_path / str(job)
        s = json.loads((run / "summary.json").read_text())
        assert s["steps"] == 3 and s["model"] == "llama_tiny" and s["device"] == "cpu", fp8
        assert math.isfinite(s["train_loss"]) and math.isfinite(s["val_loss"]) and s["val_ppl"] > 1, fp8
        assert s["tokens_per_s"] > 0 and s["wall_seconds"] > 0
        assert s["mfu"] is None and s["peak_mem_gib"] is None  # CPU
        rows = _rows(run / "csv" / "metrics.csv")
        columns = set().union(*rows)
        assert {"train/loss", "val/loss", "val/ppl", "train/tokens_per_s"} <= columns
        if fp8 == "bf16":
            assert s["fp8_recipe"] == "off" and s["fp8_layers"] == 0
            assert not any(c.startswith("fp8/") for c in columns)
        else:
            # 2 blocks x 7 linears in fp8; lm_head kept in high precision by the skip pattern
            assert s["fp8_recipe"] == fp8 and s["fp8_layers"] == 14 and s["fp8_emulated"] is True
            assert s["fp8_skipped"] == ["model.lm_head"]
            assert any(c.startswith("fp8/model.layers.0.") for c in columns)
        # the validation at the last step is in the log
        assert any(r.get("val/loss") for r in rows if r["step"] in ("2", "3")), fp8
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert (run / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_sweep_runs_each_job_and_tabulates(tmp_path):
    proc = _train(["-m", "fp8=bf16,tensorwise", f"hydra.sweep.dir={tmp_path}"] + TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = {json.loads((tmp_path / j / "summary.json").read_text())["fp8_recipe"] for j in ("0", "1")}
    assert jobs == {"off", "tensorwise"}
    table = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert set(table) == {"0", "1"}
    assert "sweep summary" in proc.stdout


@pytest.mark.slow
def test_token_file_data(tmp_path):
    import numpy as np

    ids = (np.arange(40_000) * 7919 % 300).astype(np.uint16)
    ids.tofile(tmp_path / "train.bin")
    run_dir = tmp_path / "run"
    proc = _train(TINY + ["data=tokens", f"data.path={tmp_path / 'train.bin'}", "data.vocab_size=300",
                          "data.val_fraction=0.05", "model.vocab_size=304", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["seq_len"] == 64
    # a vocabulary larger than the model's fails before training, naming both keys (in process: the
    # CLI's exit path for a ConfigError is test_bad_settings_fail_before_training's)
    from fp8train.train.app import build

    cfg = _compose(TINY + ["data=tokens", f"data.path={tmp_path / 'train.bin'}", "data.vocab_size=300"])
    with pytest.raises(ConfigError) as info:
        build(cfg)
    assert "data.vocab_size=300" in str(info.value) and "model.vocab_size" in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, rc, words",
    [
        # one of each exit path through the CLI (each run costs ~9 s of imports); the messages of
        # the other bad settings are checked in process above (test_typed_schema_rejects_while_composing,
        # test_package_dataclasses_validate_values)
        (["fp8=nope"], 1, ["Could not find 'fp8/nope'", "tensorwise", "rowwise_with_gw_hp", "bf16"]),
        (["data=tokens", "data.path=/nonexistent"], 2, ["data.path", "/nonexistent"]),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, overrides, rc, words):
    proc = _train(overrides + [f"hydra.run.dir={tmp_path}"], timeout=120)
    assert proc.returncode == rc, proc.stdout[-2000:] + proc.stderr[-2000:]
    for w in words:
        assert w in proc.stderr, proc.stderr[-2000:]
    assert "Epoch 0" not in proc.stdout + proc.stderr  # nothing trained
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy,fp8",
    [("ddp", ["fp8=delayed"]), ("fsdp2", ["fp8=delayed", "fp8.overrides.enable_fsdp_float8_all_gather=false"]),
     ("fsdp2", ["fp8=tensorwise"])],
    ids=["ddp", "fsdp2_bf16_all_gather", "fsdp2_fp8_all_gather_by_default"],
)
def test_torchrun_two_cpu_ranks(tmp_path, strategy, fp8):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAIN),
           f"trainer={strategy}", "trainer.accelerator=cpu", *fp8, f"hydra.run.dir={tmp_path}"] + TINY
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("run summary") == 1  # rank zero only
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == 3 and s["fp8_layers"] == 14
    # fp8 all-gather: every converted layer's weight is FSDP2-sharded and travels in fp8
    assert s["fp8_all_gather_layers"] == (14 if fp8 == ["fp8=tensorwise"] else 0)  # the fsdp2 default
    assert s["tokens"] == 3 * 2 * 2 * 64 and math.isfinite(s["val_loss"])

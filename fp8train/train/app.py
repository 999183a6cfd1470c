"""From a composed Hydra config to a finished run: validate, build, fit, validate, summarise.

:func:`build` turns the config into objects, checking everything a run needs before any training
step, so a bad setting fails in seconds with a :class:`ConfigError` that names the key:

* ``model`` -> ``LlamaConfig.from_name(name, **overrides)``
* ``fp8`` -> ``Float8LinearConfig.from_recipe_name(recipe, **overrides)`` and ``Float8Training``
* ``data`` -> ``TokenDataModule`` (the token file is opened and checked here)
* ``optim`` -> ``OptimConfig``; ``trainer``, ``logger``, ``callbacks`` -> objects from ``_target_``

:func:`train` runs it and returns the :class:`~fp8train.train.summary.RunSummary` (printed and
written to ``summary.json`` on global rank zero).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fp8train.config import Float8LinearConfig
from fp8train.data.datamodule import TokenDataModule
from fp8train.lightning import Float8Training
from fp8train.linear import Float8Linear
from fp8train.models.llama import Llama, LlamaConfig
from fp8train.mx_ops import mx_runs_native
from fp8train.train.module import LlamaLightningModule, OptimConfig
from fp8train.train.parallel import FSDP2Strategy, check_tensor_parallel
from fp8train.train.summary import RunSummary

__all__ = ["ConfigError", "Run", "build", "train", "fp8_config", "model_config"]


class ConfigError(ValueError):
    """A setting that cannot work; the message names the config key and what to change."""


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def model_config(cfg: DictConfig) -> LlamaConfig:
    """``LlamaConfig.from_name(model.name, **non-null model fields)``."""
    m = _plain(cfg.model)
    overrides = {k: v for k, v in m.items() if k not in ("name", "compile") and v is not None}
    try:
        return LlamaConfig.from_name(m["name"], **overrides)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def fp8_config(cfg: DictConfig, cpu: bool, fsdp2: bool = False) -> Float8LinearConfig | None:
    """The fp8 recipe with ``fp8.overrides`` applied (``None`` when ``fp8.recipe`` is null).

    On CPU ``emulate`` defaults to True: torch's CPU ``_scaled_mm`` is a reference kernel, hundreds
    of times slower than an fp32 matmul. Emulation casts to fp8 and back, so the numerics (what
    fp8 training is tested for on CPU) are the same. ``fp8.overrides.emulate=false`` forces it.

    Under FSDP2 (``fsdp2``: ``trainer=fsdp2``) ``enable_fsdp_float8_all_gather`` defaults to True
    for recipes whose weights are cast tensorwise (``tensorwise``, ``delayed``; not where the grad_input
    GEMM casts the weight differently, which would round it twice): the same losses to
    the bit, half the all-gather bytes of bf16, and faster (docs/BENCHMARKS.md: 2 x H200, 1.2B
    Llama, tensorwise 1.25-1.27x bf16 with it, 1.21-1.23x without).
    ``fp8.overrides.enable_fsdp_float8_all_gather=false`` turns it off.
    """
    f = cfg.fp8
    if f.recipe is None:
        return None
    overrides = {k: v for k, v in _plain(f.overrides).items() if v is not None}
    if cpu and "emulate" not in overrides:
        overrides["emulate"] = True
    try:
        config = Float8LinearConfig.from_recipe_name(f.recipe.value, **overrides)
    except (TypeError, ValueError) as e:  # TypeError: a nested dict with an unknown field
        raise ConfigError(f"fp8.overrides: {e}") from None
    weight = config.cast_config_weight
    # not where grad_input casts the weight differently: it would re-cast the gathered fp8 copy
    # (rounded twice), so the default would change the numbers
    if (fsdp2 and "enable_fsdp_float8_all_gather" not in overrides and weight.enabled and not weight.axiswise
            and not weight.mx and config.weight_for_grad_input == weight):
        config = replace(config, enable_fsdp_float8_all_gather=True)
    return config


def _uses_fsdp2(trainer_cfg: DictConfig) -> bool:
    """Whether ``trainer``'s strategy is the app's FSDP2 one (``trainer=fsdp2``)."""
    strategy = trainer_cfg.get("strategy")
    return isinstance(strategy, DictConfig) and str(strategy.get("_target_", "")).endswith("FSDP2Strategy")


def _fp8_callback(cfg: DictConfig, config: Float8LinearConfig) -> Float8Training:
    kwargs = {k: v for k, v in _plain(cfg.fp8).items() if k not in ("recipe", "skip", "overrides")}
    try:
        return Float8Training(config, skip=list(cfg.fp8.skip), **kwargs)
    except ValueError as e:
        raise ConfigError(f"fp8: {e}") from None


def _will_use_cpu(trainer_cfg: DictConfig) -> bool:
    accelerator = trainer_cfg.accelerator
    if accelerator == "auto":
        return not torch.cuda.is_available()
    return accelerator == "cpu"


def _instantiate(key: str, node: Any, **kwargs: Any) -> Any:
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        raise ConfigError(f"{key}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None


def _data(cfg: DictConfig, model: LlamaConfig, data_parallel_size: int, accumulate: int) -> TokenDataModule:
    d = cfg.data
    if d.path is None:
        raise ConfigError("data.path is required: a token file (data=tokens data.path=FILE), or 'embedded'")
    embedded = d.path == "embedded"
    if not embedded and not Path(d.path).is_file():
        raise ConfigError(
            f"data.path={d.path!r}: no such file; give the path of a flat token file (see configs/data/tokens.yaml), "
            f"or 'embedded' for the embedded corpus"
        )
    seq_len = d.seq_len if d.seq_len is not None else model.max_seq_len
    if seq_len > model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={seq_len} exceeds the model's max_seq_len={model.max_seq_len}; lower data.seq_len "
            f"or set model.max_seq_len={seq_len}"
        )
    vocab = d.vocab_size if d.vocab_size is not None else (256 if embedded else None)
    if vocab is None:
        raise ConfigError(
            f"data.vocab_size is required with a token file (data.path={d.path!r}); set it to the tokenizer's "
            f"vocabulary size"
        )
    if vocab > model.vocab_size:
        raise ConfigError(
            f"data.vocab_size={vocab} exceeds the model's vocab_size={model.vocab_size}; set "
            f"model.vocab_size={vocab} (or more, e.g. rounded up to a multiple of 64)"
        )
    samples = d.samples_per_epoch
    max_steps = cfg.trainer.max_steps
    if samples is None and max_steps and max_steps > 0:
        # one epoch covers the whole run: TokenDataModule's windows repeat every epoch
        samples = max_steps * accumulate * d.batch_size * data_parallel_size
    try:
        dm = TokenDataModule(
            source=d.path,
            seq_len=seq_len,
            batch_size=d.batch_size,
            val_fraction=d.val_fraction,
            vocab_size=vocab,
            token_dtype=d.dtype,
            num_workers=d.num_workers,
            seed=d.seed,
            val_batches=d.val_batches,
            samples_per_epoch=samples,
            embedded_max_bytes=d.embedded_max_bytes,
        )
        # open and check the tokens now (Lightning's setup call later is a no-op)
        dm.prepare_data()
        dm.setup("fit")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data (path={d.path!r}): {e}") from None
    return dm


def _check_tensor_parallel(trainer: L.Trainer, model: LlamaConfig) -> int:
    """The tensor-parallel size of ``trainer``'s strategy (1 without one), checked against the world
    size and the model before any process group exists."""
    strategy = trainer.strategy
    if not isinstance(strategy, FSDP2Strategy):
        return 1
    tp = strategy.tensor_parallel_size
    try:
        strategy.check_world_size(trainer.world_size)
    except ValueError as e:
        raise ConfigError(f"trainer.strategy: {e}") from None
    try:
        check_tensor_parallel(model, tp)
    except ValueError as e:
        raise ConfigError(f"model (with trainer.strategy.tensor_parallel_size={tp}): {e}") from None
    return tp


@dataclass
class Run:
    """Everything :func:`build` made from a config."""

    module: LlamaLightningModule
    datamodule: TokenDataModule
    trainer: L.Trainer
    model_config: LlamaConfig
    fp8: Float8LinearConfig | None
    fp8_callback: Float8Training | None
    output_dir: Path


def build(cfg: DictConfig) -> Run:
    """Check ``cfg`` and build the module, data, callbacks, loggers and trainer (no training).

    Raises:
        ConfigError: naming the key, the value and what to change.
    """
    try:
        output_dir = Path(cfg.paths.output_dir)
        model = model_config(cfg)
        try:
            optim = OptimConfig(**_plain(cfg.optim))
        except ValueError as e:
            raise ConfigError(f"optim: {e}") from None
        cpu = _will_use_cpu(cfg.trainer)
        fp8 = fp8_config(cfg, cpu, fsdp2=_uses_fsdp2(cfg.trainer))
        fp8_cb = _fp8_callback(cfg, fp8) if fp8 is not None else None

        callbacks = [
            _instantiate(f"callbacks.{name}", node) for name, node in cfg.callbacks.items() if node is not None
        ]
        if fp8_cb is not None:
            callbacks.append(fp8_cb)
        loggers = [_instantiate(f"logger.{name}", node) for name, node in cfg.logger.items() if node is not None]
        trainer = _instantiate("trainer", cfg.trainer, callbacks=callbacks, logger=loggers or False)
        if optim.fp8_reduce_scatter and not isinstance(trainer.strategy, ModelParallelStrategy):
            raise ConfigError(
                f"optim.fp8_reduce_scatter=true needs FSDP2 (trainer=fsdp2), not {type(trainer.strategy).__name__}; "
                f"set optim.fp8_reduce_scatter=false"
            )
        tp = _check_tensor_parallel(trainer, model)
        if optim.fp8_reduce_scatter and tp > 1:
            raise ConfigError(
                f"optim.fp8_reduce_scatter=true is not supported with trainer.strategy.tensor_parallel_size={tp} "
                f"(untested on a 2-D mesh); set optim.fp8_reduce_scatter=false or tensor_parallel_size=1"
            )
        datamodule = _data(cfg, model, trainer.world_size // tp, trainer.accumulate_grad_batches)
    except OmegaConfBaseException as e:  # e.g. an interpolation that cannot resolve
        raise ConfigError(str(e)) from None
    module = LlamaLightningModule(model, optim, compile=cfg.model.compile, seq_len=datamodule.seq_len)
    return Run(module, datamodule, trainer, model, fp8, fp8_cb, output_dir)


def train(cfg: DictConfig, started: float | None = None) -> RunSummary:
    """Build from ``cfg``, fit, validate at the last step, and report.

    Args:
        cfg: the composed config (``TrainConfig`` schema).
        started: ``time.perf_counter()`` at the start of the process, for the wall time (``None``:
            now).

    Returns:
        The run summary (on every rank; only global rank zero prints it and writes
        ``<output_dir>/summary.json``).
    """
    started = time.perf_counter() if started is None else started
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run = build(cfg)
    trainer, module = run.trainer, run.module
    rank_zero_info(f"run dir: {run.output_dir}")
    trainer.fit(module, datamodule=run.datamodule, ckpt_path=cfg.ckpt_path)
    if trainer.interrupted:
        raise SystemExit(130)
    last = module.last_val
    if last is None or last["step"] != module.global_step:
        trainer.validate(module, datamodule=run.datamodule, verbose=False)

    report = run.fp8_callback.report if run.fp8_callback is not None else None
    with torch.device("meta"):
        n_params = Llama(run.model_config).num_params()
    summary = RunSummary(
        model=cfg.model.name,
        params=n_params,
        fp8_recipe=cfg.fp8.recipe.value if cfg.fp8.recipe is not None else "off",
        fp8_emulated=_emulated(run.fp8, trainer.strategy.root_device),
        fp8_layers=len(report.converted) if report is not None else 0,
        fp8_skipped=sorted(report.skipped) if report is not None else [],
        fp8_fallback=sorted(run.fp8_callback.fallback_layers) if run.fp8_callback is not None else [],
        fp8_all_gather_layers=sum(m.config.enable_fsdp_float8_all_gather for m in module.modules()
                                  if isinstance(m, Float8Linear)) if module.device_mesh is not None else 0,
        steps=module.global_step,
        tokens=module.global_step * trainer.accumulate_grad_batches * run.datamodule.batch_size
        * run.datamodule.seq_len * trainer.world_size // _tensor_parallel_size(trainer),
        batch_size=run.datamodule.batch_size,
        seq_len=run.datamodule.seq_len,
        world_size=trainer.world_size,
        device=str(trainer.strategy.root_device.type),
        device_name=torch.cuda.get_device_name(trainer.strategy.root_device)
        if trainer.strategy.root_device.type == "cuda" else "cpu",
        precision=str(trainer.precision),
        train_loss=module.final_train_loss,
        val_loss=module.last_val["loss"] if module.last_val else None,
        val_ppl=module.last_val["ppl"] if module.last_val else None,
        tokens_per_s=module.throughput.get("tokens_per_s"),
        tokens_per_s_per_device=module.throughput.get("tokens_per_s_per_device"),
        mfu=module.throughput.get("mfu"),
        peak_mem_gib=module.throughput.get("peak_mem_gib"),
        train_seconds=module.throughput.get("train_seconds"),
        wall_seconds=time.perf_counter() - started,
        output_dir=str(run.output_dir),
        metrics_csv=_metrics_csv(trainer),
    )
    if cfg.summary and trainer.is_global_zero:
        print(summary.format(), flush=True)
        summary.write(run.output_dir / "summary.json")
    return summary


def _tensor_parallel_size(trainer: L.Trainer) -> int:
    strategy = trainer.strategy
    return strategy.tensor_parallel_size if isinstance(strategy, FSDP2Strategy) else 1


def _emulated(fp8: Float8LinearConfig | None, device: torch.device) -> bool:
    """Whether the fp8 GEMMs were emulated (asked for, or MX GEMMs on hardware without them)."""
    if fp8 is None:
        return False
    return fp8.emulate or (fp8.has_mx and not mx_runs_native(fp8, device))


def _metrics_csv(trainer: L.Trainer) -> str | None:
    from lightning.pytorch.loggers import CSVLogger

    for lg in trainer.loggers:
        if isinstance(lg, CSVLogger):
            return str(Path(lg.log_dir) / "metrics.csv")
    return None

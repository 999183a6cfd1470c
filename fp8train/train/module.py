"""``LlamaLightningModule``: next-token pretraining of :class:`fp8train.models.Llama` with Lightning.

The module knows nothing of fp8: ``fp8train.lightning.Float8Training`` swaps its linears. The model
is built in ``configure_model``, so strategies can shard it; the transforms run in torchtitan's
order, each optional::

    build Llama ─ fp8 convert ─ tensor parallel ─ activation checkpointing ─ torch.compile (per block) ─ fully_shard

Activation checkpointing is a ``LlamaConfig`` field (``Llama.forward`` applies it per block).
Without a device mesh the fp8 conversion is left to the callback, which runs it right after
``configure_model`` returns (compilation is lazy, so compiled blocks trace the converted layers).
Under ``ModelParallelStrategy`` (``trainer=fsdp2``) the blocks are sharded inside
``configure_model``, so conversion has to come first: the module asks the ``Float8Training``
callback of its trainer to convert before it applies tensor parallelism (``tensor_parallel``
mesh dim, ``fp8train.train.parallel.apply_tensor_parallel``) and ``fully_shard`` (``data_parallel``
dim).

Logged metrics (``/``-namespaced):

* ``train/loss`` every step, ``train/lr``;
* ``train/tokens_per_s`` (all ranks together), ``train/tokens_per_s_per_device``, ``train/mfu``
  (per device, against the fp8 peak when any layer runs in fp8, else bf16; GPUs only) and
  ``train/peak_mem_gib`` (CUDA only), measured over each ``log_every_n_steps`` window with one
  device sync per window, validation time excluded;
* ``val/loss`` (token-weighted mean cross-entropy, ``torchmetrics.MeanMetric`` across ranks) and
  ``val/ppl = exp(val/loss)``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.aggregation import MeanMetric
from typing_extensions import override

from fp8train.lightning import Float8Training
from fp8train.linear import Float8Linear
from fp8train.models.llama import Llama, LlamaConfig
from fp8train.optim import SECOND_MOMENT_FORMATS, AdamWFp8
from fp8train.perf import flops_per_token, mfu, peak_flops
from fp8train.reduce_scatter import enable_fp8_reduce_scatter
from fp8train.train.parallel import apply_fsdp2, apply_tensor_parallel, clip_grad_norm_, materialize

__all__ = ["OptimConfig", "LlamaLightningModule", "lr_lambda"]

#: Final train loss in the summary: mean over this many last steps (one step is noisy).
LOSS_TAIL = 20


#: ``OptimConfig.name`` choices
OPTIMIZERS = ("adamw", "adamw_fp8")


def _fail(name: str, value: Any, valid: str) -> None:
    raise ValueError(f"OptimConfig.{name}={value!r} is invalid; valid: {valid}")


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio * lr`` at the last step; ``name="adamw_fp8"`` keeps the moments in fp8/bf16
    (``fp8train.optim.AdamWFp8``: 3.03 bytes of state per parameter instead of 8).

    Weight decay applies to matrices (parameters with 2+ dims: linears and the embedding); norm
    weights are not decayed.

    Args:
        lr: peak learning rate (> 0).
        weight_decay: decoupled weight decay (>= 0).
        betas: Adam's ``(beta1, beta2)``, each in [0, 1).
        eps: Adam's epsilon (> 0).
        warmup_steps: optimizer steps of linear warmup (>= 0).
        min_lr_ratio: the learning rate at the end, as a fraction of ``lr``, in [0, 1].
        name: ``"adamw"`` (``torch.optim.AdamW``) or ``"adamw_fp8"`` (``AdamWFp8``).
        block_size: ``adamw_fp8``: elements per fp8 scale.
        second_moment: ``adamw_fp8``: ``"bf16"`` or ``"fp8"``.
        stochastic_rounding: ``adamw_fp8``: round stored moments stochastically.
        fused: ``adamw_fp8``: its Triton kernel for CUDA parameters (``None``: where it can run,
            ``true``: required, ``false``: never).
        compile: ``adamw_fp8``: ``torch.compile`` its torch update path (parameters the kernel
            does not take: CPU runs, ``fused=false``).
        fp8_reduce_scatter: FSDP2 only: reduce-scatter gradients as fp8 with fp32 accumulation
            (``fp8train.reduce_scatter``); off by default.

    Raises:
        ValueError: naming the field, its value and what is valid.
    """

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    name: str = "adamw"
    block_size: int = 128
    second_moment: str = "bf16"
    stochastic_rounding: bool = True
    fused: Optional[bool] = None
    compile: bool = False
    fp8_reduce_scatter: bool = False

    def __post_init__(self) -> None:
        if not _is_number(self.lr) or self.lr <= 0:
            _fail("lr", self.lr, "a finite number > 0")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            _fail("weight_decay", self.weight_decay, "a finite number >= 0")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else self.betas
        if not (isinstance(betas, tuple) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
            _fail("betas", self.betas, "two numbers in [0, 1), e.g. [0.9, 0.95]")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        if not _is_number(self.eps) or self.eps <= 0:
            _fail("eps", self.eps, "a finite number > 0")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            _fail("warmup_steps", self.warmup_steps, "an integer >= 0")
        if not _is_number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            _fail("min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        if self.name not in OPTIMIZERS:
            _fail("name", self.name, f"one of {list(OPTIMIZERS)}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            _fail("block_size", self.block_size, "an integer >= 1")
        if self.second_moment not in SECOND_MOMENT_FORMATS:
            _fail("second_moment", self.second_moment, f"one of {list(SECOND_MOMENT_FORMATS)}")
        if self.fused not in (None, True, False):
            _fail("fused", self.fused, "null (auto), true or false")
        for flag in ("stochastic_rounding", "compile", "fp8_reduce_scatter"):
            if not isinstance(getattr(self, flag), bool):
                _fail(flag, getattr(self, flag), "true or false")


def lr_lambda(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based): linear warmup, cosine decay.

    ``(step + 1) / warmup_steps`` during warmup (the first step already moves the weights), then
    ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * progress)) / 2`` with ``progress`` going
    from 0 after warmup to 1 at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _Clock:
    """Training time and tokens over a window, with pauses (validation) excluded."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.paused = 0.0
        self.tokens = 0

    def seconds(self, now: float) -> float:
        return max(now - self.start - self.paused, 1e-9)


class LlamaLightningModule(L.LightningModule):
    """Pretrain a Llama on ``(inputs, targets)`` batches of token ids, ``[B, T]`` int64 each.

    Args:
        model: the model shape: a ``LlamaConfig`` (or its fields as a dict, as stored in
            checkpoints' hyperparameters).
        optim: optimizer and schedule: an ``OptimConfig`` (or a dict).
        compile: ``torch.compile`` each transformer block (in place; state_dict keys unchanged).
        seq_len: training sequence length ``T`` for the FLOPs count (``None``: read from the first
            batch).

    Example:
        >>> module = LlamaLightningModule(LlamaConfig.from_name("llama_tiny"), OptimConfig(lr=3e-3))
        >>> trainer = L.Trainer(max_steps=100, callbacks=[Float8Training("tensorwise", skip=["lm_head"])])
        >>> trainer.fit(module, datamodule=TokenDataModule("embedded", seq_len=128))  # doctest: +SKIP
    """

    def __init__(
        self,
        model: LlamaConfig | dict[str, Any],
        optim: OptimConfig | dict[str, Any] | None = None,
        compile: bool = False,
        seq_len: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(model, dict):
            model = LlamaConfig(**model)
        if not isinstance(model, LlamaConfig):
            raise ValueError(f"LlamaLightningModule(model={model!r}) is invalid; valid: a LlamaConfig or its fields")
        if optim is None:
            optim = OptimConfig()
        elif isinstance(optim, dict):
            optim = OptimConfig(**optim)
        if not isinstance(optim, OptimConfig):
            raise ValueError(f"LlamaLightningModule(optim={optim!r}) is invalid; valid: an OptimConfig or its fields")
        if not isinstance(compile, bool):
            raise ValueError(f"LlamaLightningModule(compile={compile!r}) is invalid; valid: True or False")
        self.model_config, self.optim_config, self.compile_blocks = model, optim, compile
        self.seq_len = seq_len
        # plain dicts: hparams.yaml and load_from_checkpoint need no fp8train types
        self.save_hyperparameters(
            {"model": dataclasses.asdict(model), "optim": dataclasses.asdict(optim), "compile": compile,
             "seq_len": seq_len}
        )
        self.model: Llama | None = None
        self.val_loss = MeanMetric()
        # run statistics, read by the run summary
        self.last_val: dict[str, float] | None = None  # {"step", "loss", "ppl"} of the last validation
        self.final_train_loss: float | None = None
        self.throughput: dict[str, float | None] = {}
        self._loss_tail: deque[torch.Tensor] = deque(maxlen=LOSS_TAIL)
        self._window: _Clock | None = None
        self._steady: _Clock | None = None
        self._val_started: float | None = None
        self._peak = None
        self._flops_per_token: float | None = None
        self._logged_step = -1

    # --- model construction ------------------------------------------------------------------------
    @override
    def configure_model(self) -> None:
        """Build the model (once; Lightning may call this again for later stages)."""
        if self.model is not None:
            return
        mesh = self.device_mesh
        if mesh is None and self.optim_config.fp8_reduce_scatter:
            raise ValueError(
                "OptimConfig.fp8_reduce_scatter=True needs FSDP2 (trainer=fsdp2); set it to false for this strategy"
            )
        if mesh is None:
            self.model = Llama(self.model_config)
            self._compile()
            return
        # sharded: build on meta, convert, TP, compile, FSDP, then materialise only the local shards
        with torch.device("meta"):
            self.model = Llama(self.model_config)
        self._convert_fp8_before_sharding()
        if mesh.mesh_dim_names and "tensor_parallel" in mesh.mesh_dim_names:
            apply_tensor_parallel(self.model, mesh["tensor_parallel"])  # a no-op for a TP size of 1
        self._compile()
        apply_fsdp2(self.model, mesh, self.trainer.precision)
        if self.optim_config.fp8_reduce_scatter:
            enable_fp8_reduce_scatter(self.model)
        materialize(self.model, self.trainer.strategy.root_device)

    def _compile(self) -> None:
        if self.compile_blocks:
            assert self.model is not None
            for block in self.model.layers:
                block.compile()

    def _convert_fp8_before_sharding(self) -> None:
        for cb in self.trainer.callbacks:
            if isinstance(cb, Float8Training):
                # the callback's own conversion (its recipe, skip patterns and report); its pass
                # after configure_model then finds these layers converted and adopts them
                cb.convert(self)

    # --- steps -------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens``: ``[B, T]`` int64 -> logits ``[B, T, V]``."""
        if self.model is None:
            raise RuntimeError("LlamaLightningModule: the model is built in configure_model(); call it first")
        return self.model(tokens)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        logits = self(inputs)
        # fp32 softmax: bf16 logits lose the small probabilities that dominate the loss
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self._loss_tail.append(loss.detach())
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch)
        self.val_loss.update(loss, weight=batch[1].numel())

    @override
    def on_validation_epoch_end(self) -> None:
        loss = float(self.val_loss.compute())  # token-weighted mean over all ranks
        self.val_loss.reset()
        ppl = math.exp(min(loss, 80.0))
        self.log_dict({"val/loss": loss, "val/ppl": ppl}, prog_bar=True, sync_dist=False)
        if not self.trainer.sanity_checking:
            self.last_val = {"step": self.global_step, "loss": loss, "ppl": ppl}

    # --- optimizer ---------------------------------------------------------------------------------
    @override
    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim_config
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if o.name == "adamw_fp8":
            optimizer: torch.optim.Optimizer = AdamWFp8(
                groups, lr=o.lr, betas=o.betas, eps=o.eps, block_size=o.block_size,
                second_moment=o.second_moment, stochastic_rounding=o.stochastic_rounding, fused=o.fused,
                compile=o.compile,
            )
        else:
            # not fused=True: Lightning's AMP plugin refuses gradient clipping with a fused optimizer
            # (it unscales internally); the default multi-tensor (foreach) path is close in speed
            optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "LlamaLightningModule: the cosine schedule needs a finite run; set trainer.max_steps "
                "(or trainer.max_epochs)"
            )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_lambda(step, o.warmup_steps, int(total), o.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @override
    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # tensor parallel: gradients live on two meshes (2-D blocks, 1-D rest), which torch's
        # clip_grad_norm_ cannot combine
        if gradient_clip_val and self._tensor_parallel_size() > 1 and gradient_clip_algorithm in (None, "norm"):
            clip_grad_norm_(self.parameters(), float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # --- throughput, MFU, memory -------------------------------------------------------------------
    @override
    def on_train_start(self) -> None:
        fp8 = any(isinstance(m, Float8Linear) and m.fp8_enabled for m in self.modules())
        # rowwise_with_gw_hp runs one GEMM of three in bf16: the fp8 peak makes its MFU conservative
        self._peak = peak_flops(self.device, fp8=fp8)
        self.throughput = {"peak_flops": self._peak}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._window = _Clock()
        self._steady = None

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        inputs = batch[0]
        tokens = inputs.numel()
        if self._flops_per_token is None:
            self._flops_per_token = flops_per_token(self.model_config, self.seq_len or int(inputs.shape[1]))
        assert self._window is not None
        self._window.tokens += tokens
        if self._steady is not None:
            self._steady.tokens += tokens
        step = self.global_step  # optimizer steps done so far
        # the first steps include compilation, autotuning and (delayed scaling) a recompile after
        # the first amax sync: the run's throughput is measured from the end of step 2
        if self._steady is None and step >= min(2, max(1, self.trainer.max_steps - 1)):
            self._steady = _Clock()
            self._steady.start = self._sync()
        every = max(1, self.trainer.log_every_n_steps)
        if step % every == 0 and step != self._logged_step:
            self._logged_step = step
            now = self._sync()
            self.log_dict(self._rates(self._window.tokens, self._window.seconds(now)), on_step=True)
            self._window = _Clock()
            self._window.start = now

    def _rates(self, tokens: int, seconds: float) -> dict[str, float]:
        # tensor-parallel peers train on the same tokens, each doing 1/tp of the block FLOPs
        per_device = tokens / seconds / self._tensor_parallel_size()
        out = {
            "train/tokens_per_s": per_device * self.trainer.world_size,
            "train/tokens_per_s_per_device": per_device,
            "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else 0.0,
        }
        util = mfu(per_device, self._flops_per_token or 0.0, self._peak)
        if util is not None:
            out["train/mfu"] = util
        if self.device.type == "cuda":
            out["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def _tensor_parallel_size(self) -> int:
        mesh = self.device_mesh
        if mesh is None or not mesh.mesh_dim_names or "tensor_parallel" not in mesh.mesh_dim_names:
            return 1
        return mesh["tensor_parallel"].size()

    @override
    def on_validation_start(self) -> None:
        if not self.trainer.sanity_checking and self._window is not None:
            self._val_started = self._sync()

    @override
    def on_validation_end(self) -> None:
        if self._val_started is not None:
            pause = self._sync() - self._val_started
            self._val_started = None
            for clock in (self._window, self._steady):
                if clock is not None:
                    clock.paused += pause

    @override
    def on_train_end(self) -> None:
        # every rank runs this: the reductions below are collectives
        now = self._sync()
        if self._loss_tail:
            tail = torch.stack(list(self._loss_tail)).float().mean()
            self.final_train_loss = float(self.trainer.strategy.reduce(tail, reduce_op="mean"))
        clock = self._steady if self._steady is not None and self._steady.tokens else self._window
        stats: dict[str, float | None] = {"peak_flops": self._peak}
        if clock is not None and clock.tokens:
            rates = self._rates(clock.tokens, clock.seconds(now))
            stats.update(
                tokens_per_s=rates["train/tokens_per_s"],
                tokens_per_s_per_device=rates["train/tokens_per_s_per_device"],
                mfu=rates.get("train/mfu"),
                train_seconds=clock.seconds(now),
            )
        if self.device.type == "cuda":
            peak = torch.tensor(torch.cuda.max_memory_allocated(self.device) / 2**30, device=self.device)
            stats["peak_mem_gib"] = float(self.trainer.strategy.reduce(peak, reduce_op="max"))
        self.throughput = stats


"""``Float8Training``: a Lightning callback that trains a LightningModule's linears in fp8.

    from fp8train.lightning import Float8Training
    trainer = L.Trainer(callbacks=[Float8Training(config="delayed", skip=["lm_head"])])
    trainer.fit(model)   # the LightningModule itself does not change

What the callback does, and when (Lightning 2.x hook order in ``Trainer.fit``)::

    callback setup ─ LightningModule setup ─ configure_model ─ (checkpoint restore) ─ strategy setup
    (DDP/FSDP wrap, optimizers) ─ on_fit_start ─ sanity check ─ training loop

* **Swap.** The callback's ``setup`` converts the linears that already exist (models built in
  ``__init__``). It also wraps, on this model instance only, ``LightningModule.setup`` and (when
  the user overrides it) ``configure_model``, so that an idempotent conversion runs right after
  each: layers built there are converted too, still before checkpoint restore and before the
  strategy wraps the model. Lightning looks these hooks up on the instance, so the wrappers are
  called in place of the methods (by ``trainer/call.py``'s ``_call_lightning_module_hook``, inside
  ``_call_configure_model``'s init contexts); they are removed in ``teardown``. Calling
  ``configure_model`` ourselves from ``setup`` instead would run it outside those contexts and
  twice. Parameters are kept (same objects), so nothing else changes. With a strategy where
  ``configure_model`` itself shards the model (``ModelParallelStrategy`` + ``fully_shard`` /
  ``parallelize_module``), call ``Float8Training.convert(self)`` inside ``configure_model`` before
  sharding, in the order convert -> tensor parallel (``fp8train.tp`` styles) -> compile ->
  ``fully_shard`` (layers converted there, or by ``fp8train.convert_to_float8_training``, are
  adopted as they are; the weight of a layer converted after sharding is a DTensor already,
  which ``enable_fsdp_float8_all_gather`` refuses).
* **Sync.** With delayed scaling, ``sync_float8_amax_and_scale_history`` runs in
  ``on_before_optimizer_step``: Lightning calls it once per optimizer step, after the closure ran
  every micro-batch's backward (``accumulate_grad_batches > 1`` accumulates amax over the
  micro-batches and syncs once), and before the optimizer updates the weights.
* **FSDP2 fp8 all-gather.** With ``enable_fsdp_float8_all_gather=True`` and dynamic weight
  scaling, ``fp8train.precompute_float8_dynamic_scale_for_fsdp`` runs at train start and after
  every optimizer step (in ``on_train_batch_end`` of the batch that stepped), so each all-gather
  finds its weight's scale ready (see ``fp8train.fsdp``).
* **Statistics** (``stats``) are sampled on *logging steps* only (every ``log_every_n_steps``
  optimizer steps, decided at the step's first micro-batch), so other steps run no extra kernel
  and no host sync. ``"summary"`` reads what already exists: the delayed-scaling buffers (this
  step's amax, the scale its casts used, the NaN/inf counters) stacked before the sync, and the
  weights' amax (one ``_foreach_norm``); MX weights (``mxfp8``) are quantized once more to read
  their wasted bits (``fp8train.diagnostics.wasted_bits``, the mean over blocks). ``"detailed"``
  also hooks every converted layer for that step's micro-batches (a forward hook for input and
  weight, a tensor hook on the output for grad_output) and re-runs the cast math on each operand
  (``fp8train.metrics.OperandProbe``; MX operands: wasted bits, saturation and underflow of their
  MX payload, no scale).
  The numbers are folded into a ``torchmetrics`` metric (aggregated across ranks), read with one
  host transfer, and written to every logger of the trainer, at Lightning's own step value::

      fp8/<layer>/<role>/amax | scale | wasted_bits | saturation      (+ underflow | nonfinite: detailed)
      fp8/<layer>/<role>/divergence                                   1.0 on the step the guard fired
      fp8/model/saturation_max | underflow_max | wasted_bits_max      worst operand, and *_max_layer:
                                                                      its index in the fit-start list
      fp8/model/nonfinite_events | divergence_events | fallback_layers

* **Divergence guard**, on guard steps (the logging steps, or every ``guard_every_n_steps``):
  an operand whose amax went NaN/inf (delayed scaling's counters, or a measured amax) or whose
  saturated fraction exceeds ``saturation_bound`` is named, with its layer and the GEMMs it feeds.
  Saturation is measured by a cheap saturation-only probe on the delayed operands (dynamic scales
  map the amax onto the fp8 max, so they cannot saturate), also with ``stats="off"``; set
  ``guard_every_n_steps=0`` for no guard at all. Checking on sampled steps instead of every step
  avoids a host sync per step, at the price of noticing up to ``guard_every_n_steps`` steps late.
* **Validation** does not feed delayed scaling: the amax recorded by validation forwards is
  discarded, so resumed runs (which sanity-check again) train exactly like uninterrupted ones.
* **Checkpoints**: ``checkpoint["fp8train"]`` holds the recipe (``config.to_dict()``) and the
  converted layers; the callback's ``state_dict`` holds fallbacks, guard counters and
  ``is_amax_initialized`` per layer (a Python attribute, not a buffer), re-applied once the model
  is loaded. Lightning restores the model's weights *before* any callback's ``on_load_checkpoint``,
  so the check runs in a wrapper of ``LightningModule.on_load_checkpoint`` (after the user's
  own): a checkpoint from a different fp8 setup is refused there, before the strict
  ``load_state_dict``, with a list of what differs; one from a high-precision run (no fp8 state)
  gets fresh fp8 state, with a message. To load an fp8 checkpoint's weights outside
  ``fit(ckpt_path=...)``, use ``strict=False``: the ``fp8_*`` buffers are scaling state.
* **torch.compile**: sampled steps add hooks (``stats="detailed"``, or the guard with delayed
  scaling), which makes a compiled model recompile or break its graph on those steps.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import torch
import torch.nn as nn
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from fp8train.config import Float8LinearConfig, ScalingType, recipe_names
from fp8train.costmodel import GemmCostModel, for_current_device
from fp8train.convert import ConversionReport, conversion_report, convert_to_float8_training, runs_fp8_gemms
from fp8train.delayed import delayed_scales_pending, sync_float8_amax_and_scale_history
from fp8train.fsdp import precompute_float8_dynamic_scale_for_fsdp
from fp8train.linear import Float8Linear, set_weight_cast_cache
from fp8train.swiglu import Float8SwiGLU, fusable_config
from fp8train.diagnostics import wasted_bits
from fp8train.metrics import ROLES, Float8Stats, OperandProbe, local_shard, mx_payload, operand_cast_config
from fp8train.mx_ops import mx_runs_native
from fp8train.scaling import EPS, amax_to_scale, floor_pow2, fp8_max

__all__ = ["Float8Training", "CHECKPOINT_KEY"]

#: top-level checkpoint key holding the recipe and converted layers.
CHECKPOINT_KEY = "fp8train"

SkipFn = Callable[[nn.Module, str], bool]
SkipSpec = Union[str, SkipFn, Iterable[Union[str, SkipFn]], None]

_STATS = ("off", "summary", "detailed")
_ON_DIVERGENCE = ("warn", "fallback", "raise")
_FP8_BUFFER = re.compile(r"(?:^|\.)fp8_(amax_history|amax|scale|nonfinite)_(input|weight|grad_output)$")
_DELAYED_KINDS = ("amax", "amax_history", "scale", "nonfinite")
_GEMMS_OF_ROLE = {
    "input": "output and grad_weight GEMMs",
    "weight": "output and grad_input GEMMs",
    "grad_output": "grad_input and grad_weight GEMMs",
}
_STATE_VERSION = 1
_STAT_KEYS = ("amax", "amax_nonfinite", "scale", "wasted_bits", "saturation", "underflow", "nonfinite")


@dataclass
class _StepPlan:
    """What the current optimizer step samples (decided at its first micro-batch)."""

    log: bool
    guard: bool


class Float8Training(Callback):
    r"""Train a LightningModule's ``nn.Linear`` layers with fp8 GEMMs.

    Converts eligible linears to ``Float8Linear`` before the strategy wraps the model, syncs
    delayed scaling once per optimizer step, logs fp8 health metrics, guards against divergence,
    and saves the fp8 setup with checkpoints (see the module docstring for the timing of each).

    Args:
        config: a recipe name (``fp8train.recipe_names()``) or a ``Float8LinearConfig``.
        skip: layers to keep in high precision: ``fnmatch`` patterns matched against each linear's
            fully-qualified name in the LightningModule *or any dotted suffix of it* (``"lm_head"``
            matches ``model.lm_head``; ``"layers.*.wq"`` matches ``model.layers.3.wq``), and/or
            callables ``(module, fqn) -> bool`` returning ``True`` for layers to skip.
        stats: ``"summary"`` (default: amax, scale and wasted bits of what the delayed buffers
            and the weights show, saturation of delayed operands from the guard, model-level
            summaries), ``"detailed"`` (hooks measure every fp8 operand on logging steps; adds
            activations and gradients of dynamic recipes, underflow, per-layer NaN/inf counts), or
            ``"off"``. Sampled every ``trainer.log_every_n_steps`` optimizer steps.
        saturation_bound: fraction of an operand's elements saturated at the fp8 max above which
            the guard fires (``None``: check non-finite amax only). Small batches make the
            first steps of delayed scaling noisy (one batch's amax outgrows a one-entry history).
            MX operands are not checked: the OCP scale rule clamps by design, whatever the step
            (~10% of the weight of an ``nn.Linear(64, n)`` at init), so it is no sign of
            divergence; their saturation is in the metrics.
        on_divergence: what the guard does when an operand's amax is non-finite or its saturation
            passes ``saturation_bound``: ``"warn"`` (name the layer and role in a warning, once
            per operand and kind, and in the metrics), ``"fallback"`` (also run that layer in high
            precision, ``fp8_enabled=False``, for the rest of the run, resumes included), or
            ``"raise"`` (stop training with a ``RuntimeError``).
        guard_every_n_steps: check every this many optimizer steps (``None``: on logging steps,
            even with ``stats="off"``; ``0``: never). Each check costs one host sync and, with
            delayed scaling and a ``saturation_bound``, a saturation count of that step's delayed
            operands (two elementwise passes each).
        cache_weight_casts: with ``accumulate_grad_batches > 1``, cast each weight to fp8 once per
            optimizer step and reuse it for the later micro-batches (tensorwise weight recipes; costs
            ``out_features x in_features`` bytes per layer). See ``fp8train.set_weight_cast_cache``.
        auto_filter: keep linears too small for fp8 to pay in high precision (a cost model of the
            GPU; ``fp8train.costmodel``); the conversion table names each with its predicted
            speedup. ``None`` (default): on when the trainer runs on CUDA without ``emulate``. Under
            a strategy with a ``tensor_parallel`` mesh dimension it judges each rank's shard.
        eager_until_synced: with delayed scaling, run the training steps before the first sync
            without ``torch.compile`` (``fp8train.eager_until_synced``), so a compiled model
            compiles once instead of twice (its first step would otherwise be a graph of its own,
            casting with dynamic scales). Off by default: an eager step needs more memory than a
            compiled one (llama_1b on an H200: 52 vs 38 GiB peak), so a run sized to the GPU's
            memory under compile could run out of it. No effect without delayed scaling or once
            synced (a resumed checkpoint is synced).
        fuse_swiglu: run SwiGLU feed-forwards (the built-in Llama's, classes given to
            ``fp8train.register_swiglu``) as ``fp8train.Float8SwiGLU``: the SwiGLU and its backward
            fused with the fp8 casts around them. ``None`` (default): on when the trainer runs on
            CUDA without ``emulate`` and the recipe's casts are tensorwise (``tensorwise``,
            ``delayed``). Names, parameters and checkpoints are the same either way.

    Raises:
        ValueError: at construction, for an unknown recipe name or any invalid argument (the
            message names the argument, the value and the valid choices).
        RuntimeError: in ``setup`` when the accelerator cannot run fp8 GEMMs (with the fix);
            when resuming from a checkpoint of a different fp8 setup (listing what differs); with
            ``on_divergence="raise"`` when the guard fires.

    Example:
        >>> import lightning as L
        >>> from fp8train.lightning import Float8Training
        >>> trainer = L.Trainer(max_steps=10, callbacks=[Float8Training("delayed", skip=["lm_head"])])
        >>> trainer.fit(model)  # doctest: +SKIP
    """

    def __init__(
        self,
        config: str | Float8LinearConfig = "tensorwise",
        skip: SkipSpec = None,
        *,
        stats: str = "summary",
        saturation_bound: float | None = 0.01,
        on_divergence: str = "warn",
        guard_every_n_steps: int | None = None,
        cache_weight_casts: bool = True,
        auto_filter: bool | None = None,
        eager_until_synced: bool = False,
        fuse_swiglu: bool | None = None,
    ) -> None:
        if isinstance(config, str):
            if config not in recipe_names():
                raise ValueError(
                    f"Float8Training(config={config!r}) is not a known recipe; valid: one of "
                    f"{recipe_names()} or a Float8LinearConfig"
                )
            config = Float8LinearConfig.from_recipe_name(config)
        if not isinstance(config, Float8LinearConfig):
            raise ValueError(
                f"Float8Training(config={config!r}) is invalid; valid: one of {recipe_names()} or a Float8LinearConfig"
            )
        self._patterns, self._skip_fns = _parse_skip(skip)
        if stats not in _STATS:
            raise ValueError(f"Float8Training(stats={stats!r}) is invalid; valid: one of {list(_STATS)}")
        if saturation_bound is not None and (
            isinstance(saturation_bound, bool)
            or not isinstance(saturation_bound, (int, float))
            or not 0 < saturation_bound <= 1
        ):
            raise ValueError(
                f"Float8Training(saturation_bound={saturation_bound!r}) is invalid; valid: a fraction in (0, 1] or None"
            )
        if on_divergence not in _ON_DIVERGENCE:
            raise ValueError(
                f"Float8Training(on_divergence={on_divergence!r}) is invalid; valid: one of {list(_ON_DIVERGENCE)}"
            )
        if guard_every_n_steps is not None and (
            isinstance(guard_every_n_steps, bool) or not isinstance(guard_every_n_steps, int) or guard_every_n_steps < 0
        ):
            raise ValueError(
                f"Float8Training(guard_every_n_steps={guard_every_n_steps!r}) is invalid; valid: an int >= 0 or None"
            )
        if auto_filter is not None and not isinstance(auto_filter, bool):
            raise ValueError(f"Float8Training(auto_filter={auto_filter!r}) is invalid; valid: True, False or None (auto)")
        if not isinstance(cache_weight_casts, bool):
            raise ValueError(f"Float8Training(cache_weight_casts={cache_weight_casts!r}) is invalid; valid: True or False")
        if not isinstance(eager_until_synced, bool):
            raise ValueError(f"Float8Training(eager_until_synced={eager_until_synced!r}) is invalid; valid: True or False")
        if fuse_swiglu is not None and not isinstance(fuse_swiglu, bool):
            raise ValueError(f"Float8Training(fuse_swiglu={fuse_swiglu!r}) is invalid; valid: True, False or None (auto)")
        self.eager_until_synced = eager_until_synced
        self.fuse_swiglu = fuse_swiglu
        self.config = config
        self.cache_weight_casts = cache_weight_casts
        self.auto_filter = auto_filter
        self.stats = stats
        self.saturation_bound = None if saturation_bound is None else float(saturation_bound)
        self.on_divergence = on_divergence
        self.guard_every_n_steps = guard_every_n_steps

        # conversion
        self._skip_reasons: dict[str, str] = {}
        self._pattern_hits: dict[str, set[str]] = {p: set() for p in self._patterns}
        self._converted_here: set[str] = set()
        self._skipped: dict[str, str] = {}
        self._names: list[str] = []
        self._layers: list[Float8Linear] = []
        self._holder: nn.ModuleList | None = None
        self._has_delayed = False
        self._precompute = False
        self._report = ConversionReport(config=config)
        self._patches: list[tuple[nn.Module, str, Any]] = []
        # per step
        self._plan: _StepPlan | None = None
        self._stepped = False
        self._batches_since_step = 0
        self._probe: OperandProbe | None = None
        self._eager_stance: Any = None  # torch.compiler.set_stance("force_eager") while delayed layers await their first sync
        self._snapshot: dict[str, torch.Tensor] | None = None
        self._metric: Float8Stats | None = None
        self._amax_backup: list[torch.Tensor] | None = None
        # run state (saved in checkpoints)
        self._fallback: dict[str, str] = {}
        self._warned: set[tuple[str, str, str]] = set()
        self._nonfinite_seen: dict[str, int] = {}
        self._divergence_events = 0
        self._health: dict[str, dict[str, float]] = {}
        self._pending_state: dict[str, Any] | None = None
        self._infer_amax_init = False

    # --- read-only views ---------------------------------------------------------------------------
    @property
    def report(self) -> ConversionReport:
        """Converted and skipped linears (with reasons) of the model this callback set up."""
        return self._report

    @property
    def fallback_layers(self) -> dict[str, str]:
        """Layers the guard switched to high precision: name → why."""
        return dict(self._fallback)

    # --- conversion ----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._check_environment(trainer)
        self._convert(pl_module)  # layers built in __init__
        # layers built later: convert again right after the LightningModule's setup/configure_model
        self._patch(pl_module, "setup", lambda *a, **k: self._convert(pl_module))
        if is_overridden("configure_model", pl_module):
            self._patch(pl_module, "configure_model", lambda *a, **k: self._convert(pl_module))
        self._patch(pl_module, "on_load_checkpoint",
                    lambda checkpoint, *a, **k: self._check_checkpoint(trainer, pl_module, checkpoint))

    def _check_environment(self, trainer: Trainer) -> None:
        mm = self.config.linear_mm_config
        device = trainer.strategy.root_device
        if self.config.has_mx:  # MX GEMMs fall back to emulation where the hardware has none
            how = ("natively (block-scaled _scaled_mm)" if mx_runs_native(self.config, device) else
                   "emulated (dequantize, then a matmul in the compute dtype: the numerics of MX, slower than "
                   "bf16; native MX GEMMs need CUDA capability >= 10.0)")
            rank_zero_info(f"Float8Training: recipe {self.config.name!r} runs its MX GEMMs on {device.type} {how}")
        gemm_configs = (mm.output, mm.grad_input, mm.grad_weight)
        per_tensor = [g for (_, (_, a), _), g in zip(self.config.gemm_operands(), gemm_configs)
                      if a.enabled and not a.mx]
        if all(g.emulate for g in per_tensor):  # nothing needs torch._scaled_mm's per-tensor kernels
            return
        name = self.config.name
        fix = ("use an emulated recipe: Float8Training(config=" + (
            f"Float8LinearConfig.from_recipe_name({name!r}, emulate=True))" if name != "custom"
            else "dataclasses.replace(config, emulate=True))"))
        if device.type == "cuda":
            cap = torch.cuda.get_device_capability(device)
            if cap < (8, 9):
                raise RuntimeError(
                    f"Float8Training: fp8 GEMMs need a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                    f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}. To test on it, {fix}"
                )
        elif device.type != "cpu":
            raise RuntimeError(f"Float8Training: torch._scaled_mm has no {device.type!r} kernel; {fix}")

    def _keep(self, module: nn.Module, fqn: str) -> bool:
        """``module_filter_fn`` for the swap: False for layers ``skip`` selects (recording why)."""
        hits = [p for p in self._patterns if _matches(p, fqn)]
        for p in hits:
            self._pattern_hits[p].add(fqn)
        reasons = [f"skip pattern {p!r}" for p in hits]
        for fn in self._skip_fns:
            if fn(module, fqn):
                reasons.append(f"skip function {getattr(fn, '__name__', repr(fn))}")
        if reasons:
            self._skip_reasons[fqn] = "excluded by " + ", ".join(reasons)
        return not reasons

    def convert(self, pl_module: LightningModule) -> None:
        """Convert ``pl_module``'s linears now, with this callback's recipe and ``skip``.

        The callback does this itself (see the module docstring). Call it only from a
        ``configure_model`` that shards the model itself (``ModelParallelStrategy``: build, then
        ``callback.convert(self)``, then ``fully_shard``); the callback's own later pass finds the
        layers converted and leaves them as they are. Idempotent.
        """
        self._convert(pl_module)

    def _convert(self, pl_module: LightningModule) -> None:
        """Swap the linears that are not converted yet (idempotent), then re-index the layers."""
        auto: bool | GemmCostModel | None = self.auto_filter
        trainer = getattr(pl_module, "_trainer", None)
        on_cuda = trainer.strategy.root_device.type == "cuda" if trainer is not None else torch.cuda.is_available()
        if auto is None:
            auto = on_cuda and runs_fp8_gemms(self.config)
        fuse = self.fuse_swiglu
        if fuse is None:
            fuse = on_cuda and runs_fp8_gemms(self.config) and fusable_config(self.config)
        tp = _tensor_parallel_size(trainer)
        if auto is True and tp > 1:  # judge the shard each rank multiplies, not the whole layer
            auto = for_current_device().replace(tensor_parallel=tp)
        with _float32_default_dtype():
            convert_to_float8_training(pl_module, config=self.config, module_filter_fn=self._keep, auto_filter=auto,
                                       fuse_swiglu=fuse)
        report = conversion_report(pl_module)
        if report is not None:
            self._converted_here.update(report.converted)
            for name, reason in report.skipped.items():
                if reason == "already a Float8Linear":
                    continue
                self._skipped[name] = self._skip_reasons.get(name, reason)
        self._index(pl_module)

    def _index(self, pl_module: LightningModule) -> None:
        pairs = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, Float8Linear)]
        self._names = [n for n, _ in pairs]
        self._layers = [m for _, m in pairs]
        self._holder = nn.ModuleList(self._layers)
        self._has_delayed = any(m.config.has_delayed for m in self._layers)
        self._precompute = any(m.config.enable_fsdp_float8_all_gather
                               and m.config.cast_config_weight.scaling_type is ScalingType.DYNAMIC
                               for m in self._layers)
        linears = {n for n, m in pl_module.named_modules() if isinstance(m, nn.Linear)}
        skipped = {n: r for n, r in self._skipped.items() if n in linears and n not in self._names}
        fused = [n for n, m in pl_module.named_modules() if isinstance(m, Float8SwiGLU)]
        self._report = ConversionReport(converted=list(self._names), skipped=skipped, config=self.config,
                                        fused_swiglu=fused)

    # --- instance hook wrappers ----------------------------------------------------------------------
    def _patch(self, module: nn.Module, name: str, after: Callable[..., None]) -> None:
        """Make ``module.name(*args)`` run ``after(*args)`` once the original returns.

        The wrapper lives in the instance ``__dict__`` (the class is untouched), where Lightning's
        hook calls find it first; ``_unpatch`` restores whatever was there before.
        """
        if any(m is module and n == name for m, n, _ in self._patches):
            return
        previous = module.__dict__.get(name)  # an instance attribute the user set, if any
        original = getattr(module, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            after(*args, **kwargs)
            return out

        module.__dict__[name] = wrapper
        self._patches.append((module, name, previous))

    def _unpatch(self) -> None:
        for module, name, previous in reversed(self._patches):
            if previous is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = previous
        self._patches = []

    # --- fit start / end -----------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._index(pl_module)
        self._adopt_and_check(pl_module)
        legend = ", ".join(f"{i}={n}" for i, n in enumerate(self._names))
        rank_zero_info(
            f"Float8Training: recipe {self.config.name!r}, stats={self.stats!r}, "
            f"on_divergence={self.on_divergence!r}\n{self._report.table()}"
            + (f"\nlayer index (for fp8/model/*_layer metrics): {legend}" if legend else "")
        )
        device = self._layers[0].weight.device if self._layers else pl_module.device
        dtypes = [[c.target_dtype if c.enabled else None for c in _casts(m)] for m in self._layers]
        self._metric = Float8Stats(dtypes).to(device) if self._layers else None
        self._plan, self._stepped, self._snapshot, self._batches_since_step = None, False, None, 0
        self._ensure_restored()

    def _adopt_and_check(self, pl_module: LightningModule) -> None:
        adopted = [n for n in self._names if n not in self._converted_here]
        for p in self._patterns:
            hit = [n for n in adopted if _matches(p, n)]
            if hit:
                self._pattern_hits[p].update(hit)
                rank_zero_warn(f"Float8Training(skip=...): pattern {p!r} matches {hit}, which were already "
                               f"Float8Linear before the callback ran; skip does not convert them back")
        for n, m in zip(self._names, self._layers):
            if n in adopted and m.config != self.config:
                rank_zero_warn(f"Float8Training: layer {n!r} was converted before the callback with recipe "
                               f"{m.config.name!r}; it keeps that config (the callback's is {self.config.name!r})")
        linears = [n for n, m in pl_module.named_modules() if isinstance(m, nn.Linear)]
        for p, hits in self._pattern_hits.items():
            if not hits:
                rank_zero_warn(f"Float8Training(skip=...): pattern {p!r} matches no linear layer; linear layers "
                               f"of {type(pl_module).__name__}: {linears}")
        late = [n for n in linears if n not in self._names and n not in self._skipped]
        if late:
            rank_zero_warn(f"Float8Training: linear layers {late} appeared after conversion (after "
                           f"configure_model) and run in high precision; build them in __init__, setup or "
                           f"configure_model")
        low = sorted({str(b.dtype) for n, b in pl_module.named_buffers() if _FP8_BUFFER.search(n)
                      and b.is_floating_point() and b.dtype != torch.float32})
        if low:
            rank_zero_warn(f"Float8Training: delayed-scaling buffers are {low}, not float32 (a 'bf16-true'/'16-true' "
                           f"precision casts every floating buffer); amax and scales lose precision. Use "
                           f"precision='bf16-mixed', or keep fp8_* buffers in float32 in Float8Linear._apply")
        if not self._layers:
            rank_zero_warn(
                f"Float8Training: no layer of {type(pl_module).__name__} was converted to fp8, so training runs "
                f"in high precision.\n{self._report.table()}\nfp8 needs nn.Linear layers with in/out features "
                f"divisible by 16 that `skip` does not exclude."
            )

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._layers:
            return
        counters = self._read_nonfinite().tolist()
        width = max(len("layer"), *(len(n) for n in self._names))
        lines = [f"{'layer':<{width}}  {'status':<8}  {'max sat':>8}  {'max undf':>8}  {'wasted':>6}  "
                 f"{'nonfin':>6}  {'events':>6}", "-" * (width + 58)]
        for i, name in enumerate(self._names):
            h = self._health.get(name, {})
            status = "fallback" if name in self._fallback else ("hp" if not self._layers[i].fp8_enabled else "fp8")
            lines.append(
                f"{name:<{width}}  {status:<8}  {_fmt_pct(h.get('saturation')):>8}  "
                f"{_fmt_pct(h.get('underflow')):>8}  {_fmt(h.get('wasted_bits')):>6}  "
                f"{int(sum(counters[i])):>6}  {int(h.get('events', 0)):>6}"
            )
        lines.append(f"{len(self._names)} fp8 layers, {len(self._fallback)} fallback, "
                     f"{self._divergence_events} divergence events, "
                     f"{int(sum(map(sum, counters)))} non-finite amax syncs skipped")
        for name, why in self._fallback.items():
            lines.append(f"fallback {name}: {why}")
        rank_zero_info("Float8Training: fp8 health at fit end (max over sampled steps; wasted = last "
                       "sampled wasted bits, max over roles)\n" + "\n".join(lines))

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._holder is not None:
            set_weight_cast_cache(self._holder, "off")
        self._drop_probe()
        self._unpatch()
        self._end_eager()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._drop_probe()
        self._unpatch()
        self._end_eager()

    def _end_eager(self) -> None:
        if self._eager_stance is not None:
            self._eager_stance.__exit__(None, None, None)  # back to the stance before ours
            self._eager_stance = None

    # --- per step ------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_restored()  # strategies that restore after setup do it after on_fit_start
        if self._precompute:
            precompute_float8_dynamic_scale_for_fsdp(self._holder)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._layers and self.cache_weight_casts and trainer.accumulate_grad_batches > 1:
            # weights only change at the optimizer step: cast them on its first micro-batch, reuse after
            set_weight_cast_cache(self._holder, "fill" if self._plan is None else "reuse")
        if (self._has_delayed and self.eager_until_synced and self._eager_stance is None
                and delayed_scales_pending(self._holder)):
            # until the first sync the casts use dynamic scales: as a compiled graph that would be
            # compiled for this one step and again after the sync; eager, the model compiles once
            self._eager_stance = torch.compiler.set_stance("force_eager")
        if not self._layers or self._plan is not None:
            return  # no fp8, or a later micro-batch of the same optimizer step
        plan = self._plan = self._plan_step(trainer)
        if not (plan.log or plan.guard):
            return
        detailed = plan.log and self.stats == "detailed"
        if detailed:
            roles = [tuple(c.enabled for c in _casts(m)) for m in self._layers]
        elif plan.guard and self.saturation_bound is not None and self._has_delayed:
            roles = [tuple(c.scaling_type is ScalingType.DELAYED for c in _casts(m)) for m in self._layers]
        else:
            return
        self._probe = OperandProbe(self._layers, roles, full=detailed)
        self._probe.attach()

    def _plan_step(self, trainer: Trainer) -> _StepPlan:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1  # the step about to run, 1-based
        connector = getattr(trainer, "_logger_connector", None)
        if connector is not None:
            logging_step = bool(connector.should_update_logs)
        else:  # pragma: no cover - private API moved
            logging_step = trainer.log_every_n_steps > 0 and step % trainer.log_every_n_steps == 0
        n = self.guard_every_n_steps
        guard = logging_step if n is None else (n > 0 and step % n == 0)
        return _StepPlan(log=logging_step and self.stats != "off" and bool(trainer.loggers), guard=guard)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if not self._layers:
            return
        if self._plan is not None and (self._plan.log or self._plan.guard) and self._has_delayed:
            self._snapshot_delayed()
        if self._has_delayed:
            sync_float8_amax_and_scale_history(self._holder)
        self._stepped = True

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._stepped:  # accumulating: the optimizer step (and its sync) comes with a later micro-batch
            self._batches_since_step += 1
            if self._has_delayed and self._batches_since_step == max(64, 2 * trainer.accumulate_grad_batches):
                rank_zero_warn(
                    f"Float8Training: no optimizer step for {self._batches_since_step} batches, so delayed scaling "
                    f"has not synced and its scales are stale. The sync runs in on_before_optimizer_step; with "
                    f"manual optimization, step through self.optimizers() (the LightningOptimizer), not the raw "
                    f"torch optimizer"
                )
            return
        self._stepped = False
        self._batches_since_step = 0
        self._end_eager()  # the sync ran in on_before_optimizer_step
        if self._precompute:  # the weights just changed: scales for the next FSDP2 fp8 all-gathers
            precompute_float8_dynamic_scale_for_fsdp(self._holder)
        plan, self._plan = self._plan, None
        if plan is not None and (plan.log or plan.guard):
            self._finish_sampled_step(trainer, plan)
        self._drop_probe()

    # --- validation must not feed delayed scaling -------------------------------------------------------
    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_restored()
        if self._probe is not None:
            self._probe.paused = True
        if self._has_delayed:
            self._amax_backup = [b.clone() for b in self._amax_buffers()]

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._probe is not None:
            self._probe.paused = False
        if self._amax_backup is not None:
            torch._foreach_copy_(self._amax_buffers(), self._amax_backup)
            self._amax_backup = None

    # --- sampling ------------------------------------------------------------------------------------------
    def _amax_buffers(self) -> list[torch.Tensor]:
        return [getattr(m, f"fp8_amax_{r}") for m in self._layers if m.config.has_delayed for r in ROLES]

    def _stacked(self, kind: str, fill: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[L, 3]`` of a delayed buffer kind (``fill`` for layers without delayed state)."""
        dev = self._layers[0].weight.device
        rows = [
            torch.stack([getattr(m, f"fp8_{kind}_{r}").to(dev, dtype) for r in ROLES]) if m.config.has_delayed
            else torch.full((3,), fill, dtype=dtype, device=dev)
            for m in self._layers
        ]
        return torch.stack(rows)

    def _read_nonfinite(self) -> torch.Tensor:
        return self._stacked("nonfinite", 0, torch.int64)

    @torch.no_grad()
    def _snapshot_delayed(self) -> None:
        """Before the sync: this step's amax (max over micro-batches) and the scale its casts used."""
        amax = self._stacked("amax", 0.0)
        stored = self._stacked("scale", 1.0)
        maxes = torch.tensor([[fp8_max(c.target_dtype) for c in _casts(m)] for m in self._layers],
                             device=amax.device)
        initialized = torch.tensor([bool(getattr(m, "is_amax_initialized", False)) for m in self._layers],
                                   device=amax.device).unsqueeze(-1)
        pow2 = torch.tensor([m.config.round_scales_to_power_of_2 for m in self._layers], device=amax.device)
        dynamic = maxes / torch.clamp(amax, min=EPS)
        dynamic = torch.where(pow2.unsqueeze(-1), floor_pow2(dynamic), dynamic)
        scale = torch.where(initialized, stored, dynamic)  # before the first sync casts are dynamic
        delayed = torch.tensor([[c.scaling_type is ScalingType.DELAYED for c in _casts(m)] for m in self._layers],
                               device=amax.device)
        enabled = torch.tensor([m.fp8_enabled for m in self._layers], device=amax.device).unsqueeze(-1)
        mask = delayed & enabled & (amax != 0)
        snap = {"amax": amax, "scale": scale, "scaled_amax": amax * scale, "mask": mask}
        if self._snapshot is not None:  # a second optimizer step in this batch (manual optimization)
            prev = self._snapshot
            snap = {"amax": torch.maximum(prev["amax"], amax), "scale": torch.minimum(prev["scale"], scale),
                    "scaled_amax": torch.maximum(prev["scaled_amax"], amax * scale), "mask": prev["mask"] | mask}
        self._snapshot = snap

    @torch.no_grad()
    def _weight_stats(self) -> dict[str, torch.Tensor] | None:
        """amax (and scale) of dynamically scaled weights: one fused norm over all of them."""
        rows = [i for i, m in enumerate(self._layers)
                if m.fp8_enabled and m.config.cast_config_weight.scaling_type is ScalingType.DYNAMIC]
        if not rows:
            return None
        dev = self._layers[0].weight.device
        # this rank's shard of sharded weights: Float8Stats reduces amax with max across ranks
        norms = torch._foreach_norm([local_shard(self._layers[i].weight.detach()) for i in rows], math.inf)
        n = len(self._layers)
        amax = torch.zeros(n, 3, device=dev)
        scale = torch.full((n, 3), math.inf, device=dev)
        scaled = torch.zeros(n, 3, device=dev)
        mask = torch.zeros(n, 3, dtype=torch.bool, device=dev)
        wasted = torch.full((n, 3), math.nan, device=dev)
        for i, v in zip(rows, norms):
            cfg = self._layers[i].config
            cast = cfg.cast_config_weight
            amax[i, 1] = v.to(dev, torch.float32)
            mask[i, 1] = True
            if cast.mx:  # a scale per block: measure the payload (one quantize pass, logging steps only)
                weight = local_shard(self._layers[i].weight.detach())
                wasted[i, 1] = wasted_bits(mx_payload(weight, cast)).to(dev)
            elif cast.axiswise:  # every row's max lands on the fp8 max; no single scale to report
                scaled[i, 1] = fp8_max(cast.target_dtype)
            else:
                scale[i, 1] = amax_to_scale(amax[i, 1], cast.target_dtype, cfg.round_scales_to_power_of_2)
                scaled[i, 1] = amax[i, 1] * scale[i, 1]
        return {"amax": amax, "scale": scale, "scaled_amax": scaled, "mask": mask, "wasted_bits": wasted}

    def _finish_sampled_step(self, trainer: Trainer, plan: _StepPlan) -> None:
        metric = self._metric
        if metric is None:
            return
        updates: list[dict[str, Any]] = []
        snap, self._snapshot = self._snapshot, None
        if snap is not None:
            updates.append(snap)
        weights = self._weight_stats()
        if weights is not None:
            updates.append(weights)
        if self._probe is not None:
            self._probe.detach()
            updates.append({"probe": self._probe.result()})
        if self._has_delayed:
            updates.append({"nonfinite": self._read_nonfinite()})
        if updates:
            for u in updates:
                metric.update(**u)
            values = metric.compute()  # all-gathers across ranks: every rank samples the same steps
            metric.reset()
            keys = list(values)
            host = dict(zip(keys, torch.stack([values[k] for k in keys]).cpu().tolist()))  # the one host sync
        else:  # nothing observable without hooks (e.g. rowwise recipe, stats="summary")
            host = {k: [[math.nan] * 3 for _ in self._layers] for k in _STAT_KEYS}
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        events = self._guard(host, step + 1) if plan.guard else []
        error = self._act(events)
        self._update_health(host, events)
        if plan.log:
            self._log(trainer, host, events, step)
        if error is not None:
            raise RuntimeError(error)

    # --- guard ---------------------------------------------------------------------------------------
    def _guard(self, host: dict[str, list[list[float]]], step: int) -> list[tuple[str, str, str, str]]:
        """(layer, role, kind, message) for each operand that diverged since the last check."""
        events = []
        for i, name in enumerate(self._names):
            if name in self._fallback or not self._layers[i].fp8_enabled:
                continue
            for r, role in enumerate(ROLES):
                key = f"{name}/{role}"
                count = host["nonfinite"][i][r]
                bad_amax = host["amax_nonfinite"][i][r]
                sat = host["saturation"][i][r]
                if not math.isnan(count) and count > self._nonfinite_seen.get(key, 0):
                    new = int(count) - self._nonfinite_seen.get(key, 0)
                    self._nonfinite_seen[key] = int(count)
                    events.append((name, role, "nonfinite",
                                   f"amax was NaN/inf on {new} sync(s) since the last check (delayed scaling "
                                   f"skipped them)"))
                elif bad_amax == 1.0:
                    events.append((name, role, "nonfinite", "amax is NaN/inf"))
                elif (self.saturation_bound is not None and not math.isnan(sat) and sat > self.saturation_bound
                      and not operand_cast_config(self._layers[i], role).mx):
                    events.append((name, role, "saturation",
                                   f"{sat:.2%} of elements saturated at the fp8 max "
                                   f"(saturation_bound={self.saturation_bound:.2%})"))
        return [(n, r, k, f"Float8Training: fp8 divergence at step {step} in layer {n!r}, operand {r!r} "
                          f"(used by the {_GEMMS_OF_ROLE[r]}): {m}") for n, r, k, m in events]

    def _act(self, events: list[tuple[str, str, str, str]]) -> str | None:
        """Warn / fall back for each event; returns the error message when ``on_divergence='raise'``."""
        if not events:
            return None
        self._divergence_events += len(events)
        if self.on_divergence == "raise":
            return ("\n".join(m for *_, m in events) + "\n(on_divergence='raise'; on_divergence='fallback' runs "
                    "such layers in high precision instead)")
        for name, role, kind, msg in events:
            if self.on_divergence == "fallback":
                self._layers[self._names.index(name)].fp8_enabled = False
                if name not in self._fallback:
                    self._fallback[name] = msg.split(": ", 1)[1]
                    rank_zero_warn(f"{msg}; layer {name!r} now runs in high precision for the rest of the run")
            elif (name, role, kind) not in self._warned:
                self._warned.add((name, role, kind))
                rank_zero_warn(f"{msg}. Later events of this kind for this operand are counted in "
                               f"fp8/{name}/{role}/divergence without a warning")
        return None

    # --- logging ---------------------------------------------------------------------------------------
    def _log(self, trainer: Trainer, host: dict[str, list[list[float]]], events: list, step: int) -> None:
        per_layer = ("amax", "scale", "wasted_bits", "saturation")
        if self.stats == "detailed":
            per_layer += ("underflow", "nonfinite")
        metrics: dict[str, float] = {}
        for i, name in enumerate(self._names):
            for r, role in enumerate(ROLES):
                for stat in per_layer:
                    v = host[stat][i][r]
                    if not math.isnan(v):
                        metrics[f"fp8/{name}/{role}/{stat}"] = v
        for name, role, _, _ in events:
            metrics[f"fp8/{name}/{role}/divergence"] = 1.0
        for stat in ("saturation", "underflow", "wasted_bits"):
            worst = _argmax(host[stat])
            if worst is not None:
                metrics[f"fp8/model/{stat}_max"] = worst[1]
                if worst[1] > 0:  # index into the converted layers (printed at fit start)
                    metrics[f"fp8/model/{stat}_max_layer"] = float(worst[0])
        nonfinite = [v for row in host["nonfinite"] for v in row if not math.isnan(v)]
        if nonfinite:
            metrics["fp8/model/nonfinite_events"] = float(sum(nonfinite))
        metrics["fp8/model/divergence_events"] = float(self._divergence_events)
        metrics["fp8/model/fallback_layers"] = float(len(self._fallback))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _update_health(self, host: dict[str, list[list[float]]], events: list) -> None:
        for i, name in enumerate(self._names):
            h = self._health.setdefault(name, {})
            for stat in ("saturation", "underflow"):
                vals = [v for v in host[stat][i] if not math.isnan(v)]
                if vals:
                    h[stat] = max(h.get(stat, 0.0), max(vals))
            wasted = [v for v in host["wasted_bits"][i] if not math.isnan(v)]
            if wasted:
                h["wasted_bits"] = max(wasted)
        for name, *_ in events:
            h = self._health.setdefault(name, {})
            h["events"] = h.get("events", 0) + 1

    def _drop_probe(self) -> None:
        if self._probe is not None:
            self._probe.detach()
            self._probe = None

    # --- checkpoints -------------------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "version": _STATE_VERSION,
            "recipe": self.config.name,
            "config": self.config.to_dict(),
            "converted": list(self._names),
            "skipped": dict(self._report.skipped),
            "fallback": dict(self._fallback),
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "settings": {
                "config": self.config.to_dict(),
                "skip": list(self._patterns) + [getattr(f, "__name__", repr(f)) for f in self._skip_fns],
                "stats": self.stats,
                "saturation_bound": self.saturation_bound,
                "on_divergence": self.on_divergence,
                "guard_every_n_steps": self.guard_every_n_steps,
            },
            "converted": list(self._names),
            "amax_initialized": {n: bool(getattr(m, "is_amax_initialized", False))
                                 for n, m in zip(self._names, self._layers) if m.config.has_delayed},
            "fallback": dict(self._fallback),
            "warned": [list(w) for w in sorted(self._warned)],
            "nonfinite_seen": dict(self._nonfinite_seen),
            "divergence_events": self._divergence_events,
            "health": {n: dict(h) for n, h in self._health.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # applied once the model is loaded and indexed (``_ensure_restored``)
        self._pending_state = state_dict

    def _ensure_restored(self) -> None:
        """Apply a loaded callback state to the model: fallbacks and ``is_amax_initialized``."""
        state, self._pending_state = self._pending_state, None
        infer, self._infer_amax_init = self._infer_amax_init, False
        layers = dict(zip(self._names, self._layers))
        if state is not None:
            for name, why in state.get("fallback", {}).items():
                if name in layers:
                    layers[name].fp8_enabled = False
                    self._fallback[name] = why
                else:
                    rank_zero_warn(f"Float8Training: checkpoint marks {name!r} as fallback but the model has no "
                                   f"such fp8 layer")
            for name, flag in state.get("amax_initialized", {}).items():
                if name in layers and layers[name].config.has_delayed:
                    layers[name].is_amax_initialized = bool(flag)
            self._warned = {tuple(w) for w in state.get("warned", [])}  # type: ignore[misc]
            self._nonfinite_seen = {k: int(v) for k, v in state.get("nonfinite_seen", {}).items()}
            self._divergence_events = int(state.get("divergence_events", 0))
            self._health = {n: dict(h) for n, h in state.get("health", {}).items()}
        elif infer:
            # no callback state: a layer whose history holds an amax has been synced before
            for m in self._layers:
                if m.config.has_delayed:
                    m.is_amax_initialized = any(bool(getattr(m, f"fp8_amax_history_{r}").ne(0).any()) for r in ROLES)

    def _expected_fp8_state(self) -> dict[str, torch.Tensor]:
        return {f"{n}.fp8_{kind}_{r}": getattr(m, f"fp8_{kind}_{r}")
                for n, m in zip(self._names, self._layers) if m.config.has_delayed
                for kind in _DELAYED_KINDS for r in ROLES}

    def _check_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Runs inside ``LightningModule.on_load_checkpoint``, i.e. before the strict weight load."""
        self._index(pl_module)
        # a sharded checkpoint (ModelParallelStrategy / FSDP2) has no "state_dict" here: the strategy
        # has already loaded the weights into the model itself (strictly), so only the recipe is checked
        sharded = "state_dict" not in checkpoint
        state = checkpoint.get("state_dict", {})
        meta = checkpoint.get(CHECKPOINT_KEY)
        expected = self._expected_fp8_state()
        found = {k for k in state if _FP8_BUFFER.search(k)}
        problems: list[str] = []
        if meta is not None:
            # cast_kernel picks who computes the casts, not the recipe: a run may resume with another
            # (and checkpoints from before the field existed lack it)
            saved = {k: v for k, v in meta.get("config", {}).items() if k not in _NOT_RECIPE}
            now = {k: v for k, v in self.config.to_dict().items() if k not in _NOT_RECIPE}
            diff = _dict_diff(saved, now)
            if diff:
                problems.append(f"recipe: checkpoint {meta.get('recipe')!r}, this run {self.config.name!r}; "
                                f"fields that differ (checkpoint -> this run):")
                problems += [f"    {k}: {a!r} -> {b!r}" for k, a, b in diff]
            only_ckpt = [n for n in meta.get("converted", []) if n not in self._names]
            only_now = [n for n in self._names if n not in meta.get("converted", [])]
            if only_ckpt:
                problems.append(f"layers in fp8 only in the checkpoint: {only_ckpt}")
            if only_now:
                problems.append(f"layers in fp8 only in this run: {only_now}")
        if not problems and not sharded and (found or meta is not None):
            missing = sorted(set(expected) - found)
            unexpected = sorted(found - set(expected))
            if missing:
                problems.append(f"fp8 state this run needs but the checkpoint lacks (for layers "
                                f"{_layers_of(missing)}): {missing[:6]}{' ...' if len(missing) > 6 else ''}")
            if unexpected:
                problems.append(f"fp8 state in the checkpoint this run has no place for (layers "
                                f"{_layers_of(unexpected)}; a delayed-scaling checkpoint into a run without "
                                f"delayed scaling?): {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
            shapes = [f"{k}: {tuple(state[k].shape)} -> {tuple(v.shape)}" for k, v in expected.items()
                      if k in state and tuple(state[k].shape) != tuple(v.shape)]
            if shapes:
                problems.append(f"fp8 state shapes differ (amax history length?): {shapes[:6]}")
        if problems:
            raise RuntimeError(
                f"Float8Training: the checkpoint {trainer.ckpt_path!r} was saved by a run with a different fp8 "
                f"setup:\n  " + "\n  ".join(problems) + "\nResume with the same Float8Training(config=..., "
                f"skip=...) as the checkpoint (its recipe: Float8LinearConfig.from_dict(checkpoint"
                f"['{CHECKPOINT_KEY}']['config'])), or start a new run from its weights only, e.g. "
                f"model.load_state_dict(checkpoint['state_dict'], strict=False) before trainer.fit(model)."
            )
        if not sharded and not found and meta is None and self._layers:
            for key, value in expected.items():
                state[key] = value.detach().clone()
            rank_zero_info(
                f"Float8Training: checkpoint {trainer.ckpt_path!r} has no fp8 state (saved by a high-precision "
                f"run); converted {len(self._names)} layers to {self.config.name!r} and "
                + ("starting delayed scaling from fresh state" if expected else "loading the weights as they are")
            )
        callbacks = checkpoint.get("callbacks") or {}
        self._infer_amax_init = self.state_key not in callbacks


# --- helpers ---------------------------------------------------------------------------------------------
def _parse_skip(skip: SkipSpec) -> tuple[list[str], list[SkipFn]]:
    if skip is None:
        return [], []
    items = [skip] if isinstance(skip, str) or callable(skip) else skip
    try:
        items = list(items)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"Float8Training(skip={skip!r}) is invalid; valid: a glob pattern, a callable "
                         f"(module, fqn) -> bool, or a list of them") from None
    patterns, fns = [], []
    for item in items:
        if isinstance(item, str):
            patterns.append(item)
        elif callable(item):
            fns.append(item)
        else:
            raise ValueError(f"Float8Training(skip=...) item {item!r} is invalid; valid: a glob pattern (str) or "
                             f"a callable (module, fqn) -> bool returning True to skip")
    return patterns, fns


def _matches(pattern: str, fqn: str) -> bool:
    """``pattern`` matches ``fqn`` or one of its dotted suffixes (``lm_head`` ~ ``model.lm_head``)."""
    parts = fqn.split(".")
    return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def _casts(m: Float8Linear) -> tuple:
    return tuple(operand_cast_config(m, r) for r in ROLES)


@contextlib.contextmanager
def _float32_default_dtype() -> Iterator[None]:
    # configure_model runs under the precision plugin's init context, which for "bf16-true" makes
    # bf16 the default dtype; delayed-scaling buffers must stay fp32.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


#: Float8LinearConfig fields that choose an implementation, not the recipe (ignored on resume)
_NOT_RECIPE = ("cast_kernel",)


def _dict_diff(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    fa, fb = _flatten(a), _flatten(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def _layers_of(keys: Sequence[str]) -> list[str]:
    return sorted({_FP8_BUFFER.sub("", k) for k in keys})


def _argmax(rows: list[list[float]]) -> tuple[int, float] | None:
    best: tuple[int, float] | None = None
    for i, row in enumerate(rows):
        for v in row:
            if not math.isnan(v) and (best is None or v > best[1]):
                best = (i, v)
    return best


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _fmt_pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"


def _tensor_parallel_size(trainer: Trainer | None) -> int:
    """Ranks of the strategy's ``tensor_parallel`` mesh dimension (``ModelParallelStrategy`` and
    subclasses, once processes are initialized); 1 otherwise."""
    try:
        mesh = trainer.strategy.device_mesh if trainer is not None else None
    except (AttributeError, RuntimeError):  # no mesh, or not created yet
        return 1
    names = getattr(mesh, "mesh_dim_names", None) or ()
    return mesh["tensor_parallel"].size() if "tensor_parallel" in names else 1

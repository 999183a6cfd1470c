"""``Float8Linear``: an ``nn.Linear`` whose three GEMMs run in fp8.

A linear layer ``y = x @ W.T`` with ``x: [M, K]`` (M = batch × sequence tokens), ``W: [N, K]`` runs
three GEMMs per training step::

    GEMM         equation                  shapes                    operands (cast config)
    output       y  = x  @ W.T             [M,K] @ [K,N] -> [M,N]    input, weight
    grad_input   dx = dy @ W               [M,N] @ [N,K] -> [M,K]    grad_output, weight_for_grad_input
    grad_weight  dW = dy.T @ x             [N,M] @ [M,K] -> [N,K]    grad_output_for_grad_weight, input_for_grad_weight

Every operand is cast to fp8 *along the GEMM's inner dimension* (that is what an axiswise scale
must follow: ``[M,1]`` for the left operand, ``[1,N]`` for the right one), so the same tensor may
need a different cast per GEMM: ``x`` is reduced along K for the output GEMM but along M for
grad_weight. Where the two casts agree (tensorwise, same config) the fp8 tensor from the forward is
saved and reused in backward — half the activation memory of bf16 and no second cast; otherwise the
high-precision tensor is saved and cast again in backward.

Each GEMM runs with its own ``ScaledMMConfig`` (``config.linear_mm_config``): by default fast
accumulation for ``output`` only. Casts with ``scaling_granularity="mx"`` (the ``mxfp8`` recipe)
produce MX block-scaled operands instead; ``fp8train.mx_ops`` casts and multiplies those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from fp8train import cast_kernel
from fp8train.config import CastConfig, Float8LinearConfig, GemmInputRole, LinearMMConfig, ScaledMMConfig, ScalingType
from fp8train.delayed import record_amax, register_delayed_buffers
from fp8train.fsdp import enable_float8_all_gather
from fp8train.mx_ops import MxOperand, mx_cast, mx_mm
from fp8train.ops import Fp8Operand, scaled_mm_operands
from fp8train.scaling import amax_to_scale, from_float8, saturated_cast, tensor_amax
from fp8train.tensor import Float8Tensor
from fp8train.tp import sharded_forward

__all__ = ["Float8Linear", "set_weight_cast_cache"]

_LINK_INPUTS_TO_OUTPUT = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13)
INPUT, WEIGHT, GRAD_OUTPUT = GemmInputRole.INPUT, GemmInputRole.WEIGHT, GemmInputRole.GRAD_OUTPUT
Operand = Fp8Operand | MxOperand | torch.Tensor  # fp8 (data, scale), MX blocks, or high precision (disabled)


@dataclass(frozen=True)
class _Plan:
    """Static facts of one call (constants for torch.compile)."""

    config: Float8LinearConfig
    mm: LinearMMConfig
    compute_dtype: torch.dtype  # dtype of activations and GEMM results (autocast dtype or input's)
    use_stored_scales: bool  # delayed operands use their stored scale (False until the first sync)
    need_grad_input: bool  # input.requires_grad, read outside the autograd function: some torch
    need_grad_weight: bool  # versions trace ctx.needs_input_grad wrongly under torch.compile
    record_amax: bool  # input/weight: training mode, and not an activation-checkpoint recompute
    record_grad_amax: bool  # grad_output: training mode (also when this forward is a recompute:
    # reentrant checkpointing runs backward through the recompute's graph)
    weight_cache: str = "off"  # "fill": cast the weight and store it; "reuse": use the stored cast


def _cast(
    t: torch.Tensor,
    cfg: CastConfig,
    role: GemmInputRole,
    reduce_dim: int,
    plan: _Plan,
    scale: torch.Tensor | None = None,
    amax: torch.Tensor | None = None,
    *,
    rows: bool = True,
    cols: bool = False,
) -> Operand:
    """The one cast decision: hp passthrough, delayed (stored scale), or dynamic (own amax).

    ``reduce_dim`` is the operand's GEMM inner dimension (used by axiswise and MX casts).
    ``scale``/``amax`` are the delayed-scaling buffers of this role (``None`` when not delayed);
    the current amax is always recorded into ``amax`` so the next sync sees it.
    ``rows``/``cols``: the layouts of the fp8 data this layer's GEMMs will take (row-major,
    column-major). The Triton cast kernel writes exactly those from one read of ``t``; torch casts
    write row-major and a GEMM that needs the other layout copies it.
    """
    if not cfg.enabled:
        return t.to(plan.compute_dtype)
    if cfg.mx:  # MX blocks along the inner dim; always dynamic
        return mx_cast(t, cfg, reduce_dim)
    pow2 = plan.config.round_scales_to_power_of_2
    kernel = _kernel_casts(t, cfg, plan)
    if cfg.scaling_type is ScalingType.DELAYED and scale is not None:
        record = amax is not None and (plan.record_grad_amax if role is GRAD_OUTPUT else plan.record_amax)
        if plan.use_stored_scales and kernel:  # cast and amax from one read
            return _kernel_cast(t, scale, cfg.target_dtype, rows, cols, amax if record else None)
        if record:
            record_amax(amax, t)
        if plan.use_stored_scales:
            return Fp8Operand(saturated_cast(t, scale, cfg.target_dtype), scale)
    dim = reduce_dim % t.dim() if cfg.axiswise else None
    s = amax_to_scale(tensor_amax(t, dim), cfg.target_dtype, pow2)
    if kernel:
        return _kernel_cast(t, s, cfg.target_dtype, rows, cols, None)
    if dim == 0 and t.dim() == 2:
        # Reduced along the token dim M: the grad_weight GEMM wants this operand M-major. Cast the
        # transpose straight into that layout (one fused pass under inductor) instead of casting
        # row-major and copying the fp8 tensor into the transposed layout afterwards.
        data_t = saturated_cast(t.t(), s.t(), cfg.target_dtype).contiguous()
        return Fp8Operand(data_t.t(), s)
    return Fp8Operand(saturated_cast(t, s, cfg.target_dtype), s)


def _kernel_casts(t: torch.Tensor, cfg: CastConfig, plan: _Plan) -> bool:
    """Does the Triton kernel cast ``t``? Tensorwise casts on a device it runs on, with ``cast_kernel``
    ``"triton"``, or ``"auto"`` outside torch.compile."""
    mode = plan.config.cast_kernel
    if mode == "torch" or cfg.axiswise or (mode == "auto" and torch.compiler.is_compiling()):
        # Under torch.compile, "auto" leaves casts to inductor: it fuses them into their producers
        # (SwiGLU, RMSNorm, the previous GEMM's epilogue) and recomputes them in backward instead of
        # saving fp8 copies. llama_1b on an H200: 88,493 tokens/s and 38.3 GiB with inductor's casts,
        # 87,601 and 42.1 GiB with the kernel (PERF_NOTES entry 15). An opaque kernel wins only where
        # nothing can be fused into the cast (a lone layer: up to 4% faster).
        return False
    return cast_kernel.fits(t, cfg.target_dtype)


def _kernel_cast(
    t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, rows: bool, cols: bool, amax: torch.Tensor | None
) -> Fp8Operand:
    y, yt, seen = cast_kernel.cast_transpose(t, scale, dtype, row_major=rows, transposed=cols, amax=amax is not None)
    if amax is not None:
        amax.copy_(torch.maximum(amax, seen))
    if y is None:
        return Fp8Operand(yt.t(), scale)
    return Fp8Operand(y, scale, None if yt is None else yt.t())


def _gemm(a: Operand, b: Operand, cfg: ScaledMMConfig, out_dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.Tensor:
    if isinstance(a, Fp8Operand):
        return scaled_mm_operands(a, b, cfg, out_dtype)
    if isinstance(a, MxOperand):
        return mx_mm(a, b, cfg, out_dtype, compute_dtype)
    return torch.mm(a.to(compute_dtype), b.to(compute_dtype)).to(out_dtype)


def _flat(t: Operand | None) -> tuple[torch.Tensor | None, ...]:
    return (t.data, t.scale) if isinstance(t, Fp8Operand) else (t,)


def _given(t: Float8Tensor) -> Fp8Operand:
    """An operand that arrived already in fp8: the weight after FSDP2's fp8 all-gather
    (``fp8train.fsdp``), the input after a sequence-parallel fp8 all-gather (``fp8train.tp``)."""
    return Fp8Operand(t._data, t._scale)


def _hp(t: torch.Tensor, t8: Operand) -> torch.Tensor:
    """``t`` in high precision, for a backward GEMM that casts it differently from the forward."""
    return t8.dequantize(t.dtype) if isinstance(t, Float8Tensor) else t


def _column_major(t8: Operand) -> Operand:
    """The layout of ``t8`` that backward's GEMM takes (column-major, when the cast wrote it): saving
    only that one keeps the saved fp8 bytes at one copy."""
    if isinstance(t8, Fp8Operand) and t8.other is not None:
        return Fp8Operand(t8.other, t8.scale)
    return t8


def _link(t: torch.Tensor) -> torch.Tensor:
    """An exact zero that depends on ``t`` (see ``_LINK_INPUTS_TO_OUTPUT``); fp8 data cannot be multiplied."""
    return (t._scale if isinstance(t, Float8Tensor) else t).reshape(-1)[:1] * 0


def _reusable(forward_cfg: CastConfig, backward_cfg: CastConfig) -> bool:
    """Can the forward's fp8 operand serve the backward GEMM as is?"""
    # axiswise and MX casts reduce along the GEMM's inner dim, which differs between forward and backward
    return forward_cfg.enabled and forward_cfg == backward_cfg and not (forward_cfg.axiswise or forward_cfg.mx)


def _weight_operand(
    weight: torch.Tensor, plan: _Plan, scale: torch.Tensor | None, amax: torch.Tensor | None,
    cache: tuple[torch.Tensor, ...], cols: bool,
) -> Operand:
    """The weight for the output GEMM: as gathered in fp8 (FSDP2), from the micro-batch cache, or cast
    (and stored in the cache on its "fill" step). ``cache`` is ``(fp8 data, scale)`` when in use."""
    if isinstance(weight, Float8Tensor):
        return _given(weight)
    if plan.weight_cache == "reuse":  # a later micro-batch: the weight has not changed since "fill"
        return Fp8Operand(cache[0], cache[1])
    w8 = _cast(weight, plan.config.cast_config_weight, WEIGHT, -1, plan, scale, amax, cols=cols)
    if plan.weight_cache == "fill":
        cache[0].copy_(w8.data)
        cache[1].copy_(w8.scale)
    return w8


class _Float8LinearFn(torch.autograd.Function):
    """``input @ weight.T`` with fp8 GEMMs in forward and backward. ``input`` is 2-D ``[M, K]``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        plan: _Plan,
        *state: torch.Tensor,
    ) -> torch.Tensor:
        cfg = plan.config
        delayed, cache = (state[:6], state[6:]) if cfg.has_delayed else ((), state)
        amax_x, amax_w, amax_go, scale_x, scale_w, scale_go = delayed or (None,) * 6

        need_dx, need_dw = plan.need_grad_input, plan.need_grad_weight
        x_reused = _reusable(cfg.cast_config_input, cfg.input_for_grad_weight)
        w_reused = _reusable(cfg.cast_config_weight, cfg.weight_for_grad_input)

        # GEMM 1: output = input @ weight.T      [M,K] @ [K,N] -> [M,N]
        # (a cast that backward reuses is also written column-major, the layout its backward GEMM takes)
        if isinstance(x, Float8Tensor):
            x8 = _given(x)
        else:
            x8 = _cast(x, cfg.cast_config_input, INPUT, -1, plan, scale_x, amax_x, cols=need_dw and x_reused)
        w8 = _weight_operand(weight, plan, scale_w, amax_w, cache, cols=need_dx and w_reused)
        out = _gemm(x8, w8.t(), plan.mm.output, plan.compute_dtype, plan.compute_dtype)
        if _LINK_INPUTS_TO_OUTPUT:
            # torch 2.11's dynamo keeps gradients only for inputs the traced forward output depends
            # on differentiably, and _scaled_mm / fp8 casts have no derivative: link both inputs with
            # an exact zero (1-element products; inductor fuses the add into the next pointwise op).
            out = out + (_link(x) + _link(weight)).to(out.dtype)

        x_keep = _column_major(x8) if x_reused else _hp(x, x8)
        w_keep = _column_major(w8) if w_reused else _hp(weight, w8)
        # Fp8Operand is a tuple: save its tensors and rebuild it in backward
        x_saved = (x_keep if need_dw else None)
        w_saved = (w_keep if need_dx else None)
        ctx.x_fp8, ctx.w_fp8 = isinstance(x_saved, Fp8Operand), isinstance(w_saved, Fp8Operand)
        ctx.save_for_backward(*_flat(x_saved), *_flat(w_saved), amax_go, scale_go)
        ctx.plan = plan
        ctx.n_state = len(state)
        ctx.dtypes = (x.dtype, weight.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        x_keep = Fp8Operand(saved.pop(0), saved.pop(0)) if ctx.x_fp8 else saved.pop(0)
        w_keep = Fp8Operand(saved.pop(0), saved.pop(0)) if ctx.w_fp8 else saved.pop(0)
        amax_go, scale_go = saved
        if amax_go is not None and not torch.compiler.is_compiling():
            # update the buffer through .data: an in-place update of the saved tensor itself would
            # bump its autograd version and fail the backward of an earlier call of this layer
            # (a layer applied twice in one step)
            amax_go = amax_go.data
        plan: _Plan = ctx.plan
        cfg = plan.config
        x_dtype, w_dtype = ctx.dtypes
        need_dx, need_dw = plan.need_grad_input, plan.need_grad_weight
        grad_out = grad_out.contiguous()
        go_reused = _reusable(cfg.cast_config_grad_output, cfg.grad_output_for_grad_weight)
        go_cols = need_dw and go_reused  # grad_weight takes grad_output.T row-major: grad_output column-major
        go8 = _cast(grad_out, cfg.cast_config_grad_output, GRAD_OUTPUT, -1, plan, scale_go, amax_go,
                    rows=need_dx or not go_cols, cols=go_cols)

        grad_x = grad_w = None
        if need_dx:
            # GEMM 2: grad_input = grad_output @ weight      [M,N] @ [N,K] -> [M,K]
            # (re-casts below ask for the layout their GEMM takes: the right operand column-major)
            w_gi = w_keep if isinstance(w_keep, Fp8Operand) else _cast(
                w_keep, cfg.weight_for_grad_input, WEIGHT, 0, plan, rows=False, cols=True)
            grad_x = _gemm(go8, w_gi, plan.mm.grad_input, x_dtype, plan.compute_dtype)
        if need_dw:
            # GEMM 3: grad_weight = grad_output.T @ input    [N,M] @ [M,K] -> [N,K]
            if go_reused:
                go_gw = go8
            else:
                go_gw = _cast(grad_out, cfg.grad_output_for_grad_weight, GRAD_OUTPUT, 0, plan, rows=False, cols=True)
            x_gw = x_keep if isinstance(x_keep, Fp8Operand) else _cast(
                x_keep, cfg.input_for_grad_weight, INPUT, 0, plan, rows=False, cols=True)
            grad_w = _gemm(go_gw.t(), x_gw, plan.mm.grad_weight, w_dtype, plan.compute_dtype)
        return (grad_x, grad_w, None) + (None,) * ctx.n_state


def _in_backward_recompute() -> bool:
    """True while activation checkpointing re-runs this forward inside backward.

    The recompute sees the same operands as the original forward, whose amax is recorded
    already; recording it again would be redundant work. (Under torch.compile the partitioner
    recomputes without re-running buffer mutations, so only eager needs this.)
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class Float8Linear(nn.Linear):
    """Drop-in ``nn.Linear`` (same parameters and state_dict keys) that trains with fp8 GEMMs.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        config: how operands are cast and GEMMs run (default: the ``tensorwise`` recipe).

    Inputs of any rank ``[..., in_features]`` work; under autocast the GEMMs produce the autocast
    dtype. With delayed scaling the layer holds ``fp8_*`` buffers (see ``fp8train.delayed``) and
    expects ``fp8train.sync_float8_amax_and_scale_history(model)`` once per optimizer step.

    Example:
        >>> lin = Float8Linear.from_float(nn.Linear(64, 32), Float8LinearConfig(emulate=True))
        >>> lin(torch.randn(4, 8, 64)).shape
        torch.Size([4, 8, 32])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        config: Float8LinearConfig | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.config = config if config is not None else Float8LinearConfig()
        self.linear_mm_config = self.config.linear_mm_config
        #: False runs this layer in high precision (set by the divergence guard's fallback).
        self.fp8_enabled = True
        #: "off", "fill" or "reuse"; see ``set_weight_cast_cache``.
        self.weight_cast_cache = "off"
        if self.config.has_delayed:
            register_delayed_buffers(self, self.config, self.weight.device)
        if self.config.enable_fsdp_float8_all_gather:
            enable_float8_all_gather(self)

    @classmethod
    def from_float(cls, mod: nn.Linear, config: Float8LinearConfig | None = None) -> "Float8Linear":
        """A Float8Linear sharing ``mod``'s parameter objects (an existing optimizer keeps working)."""
        with torch.device("meta"):
            new = cls(mod.in_features, mod.out_features, bias=False, config=config)
        new.weight = mod.weight
        new.bias = mod.bias
        new.train(mod.training)
        if new.config.has_delayed:
            register_delayed_buffers(new, new.config, mod.weight.device)
        if new.config.enable_fsdp_float8_all_gather:
            enable_float8_all_gather(new)  # a new Parameter object wrapping the same data
        return new

    def _delayed_state(self) -> tuple[torch.Tensor, ...]:
        if not self.config.has_delayed:
            return ()
        return tuple(getattr(self, f"fp8_{k}_{r}") for k in ("amax", "scale") for r in ("input", "weight", "grad_output"))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, DTensor):  # tensor parallel: the GEMMs run on this rank's shards
            return sharded_forward(self, input, self._forward)
        return self._forward(input, self.weight, self.bias)

    def _forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.fp8_enabled:
            hp = [from_float8(t) if isinstance(t, Float8Tensor) else t for t in (input, weight)]
            return F.linear(hp[0], hp[1], bias)
        device_type = input.device.type
        if self.config.cast_kernel == "triton" and self.config.has_tensorwise and not cast_kernel.supports(input.device):
            raise ValueError(
                f"Float8LinearConfig.cast_kernel='triton' needs Triton and an NVIDIA GPU of compute capability "
                f"8.9+; this layer runs on {input.device}. Set cast_kernel='auto' (the kernel where it runs) or 'torch'"
            )
        plan = self._plan(input, weight)
        x = input.reshape(-1, input.shape[-1]).to(plan.compute_dtype)
        with torch.autocast(device_type, enabled=False):
            out = _Float8LinearFn.apply(x, weight, plan, *self._state(plan))
        out = out.reshape(*input.shape[:-1], weight.shape[0])
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out

    def _plan(self, input: torch.Tensor, weight: torch.Tensor) -> _Plan:
        """This call's static facts (``input`` is the layer's input, ``weight`` the weight it multiplies)."""
        device_type = input.device.type
        autocast = torch.is_autocast_enabled(device_type)
        return _Plan(
            config=self.config,
            mm=self.linear_mm_config,
            compute_dtype=torch.get_autocast_dtype(device_type) if autocast else input.dtype,
            use_stored_scales=bool(getattr(self, "is_amax_initialized", False)),
            # under no_grad (eval, inference) no backward runs: nothing is saved or cast for it
            need_grad_input=input.requires_grad and torch.is_grad_enabled(),
            need_grad_weight=weight.requires_grad and torch.is_grad_enabled(),
            record_amax=self.training and not _in_backward_recompute(),
            record_grad_amax=self.training,
            weight_cache=self.weight_cast_cache if self.training else "off",
        )

    def _state(self, plan: _Plan) -> tuple[torch.Tensor, ...]:
        """The buffers ``_Float8LinearFn`` takes after the plan: delayed scaling's six, then the
        weight-cast cache's two when it is in use."""
        state = self._delayed_state()
        if plan.weight_cache != "off":
            state += (self.fp8_weight_cache, self.fp8_weight_cache_scale)
        return state

    @property
    def supports_weight_cast_cache(self) -> bool:
        """Whether one fp8 cast of the weight can serve every GEMM of a step (tensorwise weight
        casts that the grad_input GEMM reuses as they are)."""
        # not for sharded weights: the cache would hold the whole weight on every rank
        return _reusable(self.config.cast_config_weight, self.config.weight_for_grad_input) and not isinstance(
            self.weight, DTensor)

    def _apply(self, fn: Any, recurse: bool = True) -> "Float8Linear":
        # Scaling state stays fp32 whatever dtype the module is cast to (model.to(torch.bfloat16),
        # Lightning's precision="bf16-true"): a bf16 amax history would change the scales.
        keep = {id(b) for n, b in self._buffers.items() if n.startswith("fp8_") and b is not None}

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if id(t) in keep and out.dtype != t.dtype:
                return t.to(device=out.device)
            return out

        return super()._apply(keep_dtype, recurse)

    def extra_repr(self) -> str:
        c = self.config
        casts = f"input={c.cast_config_input}, weight={c.cast_config_weight}, grad_output={c.cast_config_grad_output}"
        return f"{super().extra_repr()}, {casts}, fp8_enabled={self.fp8_enabled}"


_CACHE_MODES = ("off", "fill", "reuse")


def set_weight_cast_cache(model: nn.Module, mode: str) -> int:
    """Reuse each layer's fp8 weight cast across the micro-batches of one optimizer step.

    With gradient accumulation the weights do not change between micro-batches, so their fp8 cast
    need not be redone. Call with ``"fill"`` before the first micro-batch of a step (the cast is
    made and stored in the non-persistent buffers ``fp8_weight_cache``/``fp8_weight_cache_scale``,
    ``out_features x in_features`` bytes per layer), ``"reuse"`` before each later micro-batch, and
    ``"off"`` to stop. Layers whose recipe casts the weight axiswise are left alone. Eval-mode
    forwards always cast afresh. Under ``torch.compile`` the two modes are two graphs, each compiled
    once. The Lightning callback drives this for you.

    Returns:
        The number of layers that use the cache.

    Raises:
        ValueError: unknown mode, or ``"reuse"`` before any ``"fill"``.
    """
    if mode not in _CACHE_MODES:
        raise ValueError(f"mode={mode!r} is invalid; valid: one of {list(_CACHE_MODES)}")
    n = 0
    for m in model.modules():
        if not isinstance(m, Float8Linear) or not m.supports_weight_cast_cache:
            continue
        if mode == "reuse" and m.weight_cast_cache == "off":
            raise ValueError(
                "set_weight_cast_cache(model, 'reuse') before any 'fill': call it with 'fill' before the "
                "first micro-batch of the step"
            )
        if mode != "off" and getattr(m, "fp8_weight_cache", None) is None:
            w = m.weight
            m.register_buffer("fp8_weight_cache", torch.empty(w.shape, dtype=m.config.cast_config_weight.target_dtype,
                                                              device=w.device), persistent=False)
            m.register_buffer("fp8_weight_cache_scale", torch.ones((), device=w.device), persistent=False)
        m.weight_cast_cache = mode
        n += 1
    return n

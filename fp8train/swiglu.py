"""``Float8SwiGLU``: a SwiGLU feed-forward whose three fp8 linears run as one autograd function, the
element-wise SwiGLU fused into the fp8 casts that follow it.

A SwiGLU feed-forward ``y = down(silu(gate(x)) * up(x))`` with ``x: [M, D]``, gate/up ``W1, W3:
[F, D]`` and down ``W2: [D, F]`` runs, per training step::

    step                 equation                               shapes                    cast by
    gate output          h1 = x8 @ W1.T                         [M,D] @ [D,F] -> [M,F]    x cast once,
    up output            h3 = x8 @ W3.T                         [M,D] @ [D,F] -> [M,F]    for both GEMMs
    SwiGLU               g8 = fp8(silu(h1) * h3)                [M,F]                     one kernel
    down output          y  = g8 @ W2.T                         [M,F] @ [F,D] -> [M,D]
    down grad_input      dg = dy8 @ W2                          [M,D] @ [D,F] -> [M,F]
    SwiGLU backward      dh1, dh3 in fp8, both layouts;         [M,F], [F,M]              one kernel
                         g8 transposed, recomputed
    down grad_weight     dW2 = dy8.T @ g8                       [D,M] @ [M,F] -> [D,F]
    gate/up grad_input   dx = dh1 @ W1 + dh3 @ W3               [M,F] @ [F,D] -> [M,D]
    gate/up grad_weight  dW1 = dh1.T @ x8,  dW3 = dh3.T @ x8    [F,M] @ [M,D] -> [F,D]

Run as three ``Float8Linear`` layers, the SwiGLU and its backward are separate ops whose results
each linear then casts: under ``torch.compile`` inductor fuses them, but writes the transposed fp8
layouts untiled (the backward ran at 2.7x the HBM roofline on an H200, ``docs/PERF_NOTES.md``
entries 16 and 20). Here ``fp8train.swiglu_kernel`` does each pass in one tiled read; backward
recomputes ``g`` from ``h1, h3`` (read anyway) instead of saving it.

The three layers stay ``Float8Linear`` children under their own names: parameters, state_dict keys,
delayed-scaling buffers, weight-cast caches, ``fp8_enabled`` flags and the conversion report are
theirs. The fused path needs the three to share one config whose casts are tensorwise (dynamic or
delayed) and the same in forward and backward (``tensorwise``, ``delayed`` recipes), no bias, no
forward hooks (fp8 statistics hook the layers), fp8 enabled on all three and weights that are not
tensor-parallel DTensors; otherwise (``Float8SwiGLU.unfused_reason``) it runs the three layers one
by one, which is the same computation. With delayed scaling ``x`` is cast once with the gate's
stored scale and its amax recorded for both layers (they see the same input, so their histories
agree).

``convert_to_float8_training`` wraps the feed-forwards it knows (the built-in Llama's, and classes
given to ``register_swiglu``) when ``fuse_swiglu`` allows it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from fp8train import cast_kernel, swiglu_kernel
from fp8train.config import Float8LinearConfig, GemmInputRole, ScalingType
from fp8train.models.llama import FeedForward
from fp8train.linear import (
    _LINK_INPUTS_TO_OUTPUT,
    Float8Linear,
    _cast,
    _column_major,
    _gemm,
    _link,
    _Plan,
    _reusable,
    _weight_operand,
)
from fp8train.ops import Fp8Operand
from fp8train.scaling import amax_to_scale, saturated_cast
from fp8train.tensor import Float8Tensor

__all__ = ["Float8SwiGLU", "register_swiglu", "swiglu_names", "fusable_config"]

INPUT, GRAD_OUTPUT = GemmInputRole.INPUT, GemmInputRole.GRAD_OUTPUT


def fusable_config(config: Float8LinearConfig) -> bool:
    """Whether ``Float8SwiGLU`` can run layers of this config fused: every operand cast tensorwise
    (dynamic or delayed) and the same for the forward and backward GEMMs."""
    c = config
    pairs = ((c.cast_config_input, c.input_for_grad_weight), (c.cast_config_weight, c.weight_for_grad_input),
             (c.cast_config_grad_output, c.grad_output_for_grad_weight))
    return all(_reusable(a, b) for a, b in pairs)


class _LayerState(NamedTuple):
    """One layer's buffers as ``_Float8LinearFn`` takes them (``None`` where not delayed)."""

    amax_x: torch.Tensor | None
    amax_w: torch.Tensor | None
    amax_go: torch.Tensor | None
    scale_x: torch.Tensor | None
    scale_w: torch.Tensor | None
    scale_go: torch.Tensor | None
    cache: tuple[torch.Tensor, ...]


def _layer_state(state: tuple[torch.Tensor, ...], plan: _Plan) -> _LayerState:
    if plan.config.has_delayed:
        return _LayerState(*state[:6], cache=tuple(state[6:]))
    return _LayerState(None, None, None, None, None, None, cache=tuple(state))


@dataclass(frozen=True)
class _SwiGLUPlan:
    """Static facts of one fused call: each layer's ``_Plan`` (gate's ``need_grad_input`` is
    ``x``'s; down's is whether anything upstream needs a gradient), how many state tensors each
    layer passes, and whether the SwiGLU passes run as Triton kernels."""

    gate: _Plan
    up: _Plan
    down: _Plan
    n_state: tuple[int, int, int]
    kernel: bool


def _record(amax: torch.Tensor, seen: torch.Tensor) -> None:
    amax.copy_(torch.maximum(amax, seen))


def _swiglu_cast(h1: torch.Tensor, h3: torch.Tensor, plan: _Plan, st: _LayerState, kernel: bool) -> Fp8Operand:
    """``g8 = fp8(silu(h1) * h3)`` row-major, cast as the down layer casts its input."""
    cfg = plan.config.cast_config_input
    if not (kernel and swiglu_kernel.fits(h1, h3)):
        return _cast(swiglu_kernel.swiglu_reference(h1, h3), cfg, INPUT, -1, plan, st.scale_x, st.amax_x)
    record = st.amax_x is not None and plan.record_amax
    if cfg.scaling_type is ScalingType.DELAYED and st.scale_x is not None and plan.use_stored_scales:
        g8, seen = swiglu_kernel.swiglu_cast(h1, h3, st.scale_x, cfg.target_dtype, amax=record)
        if record:
            _record(st.amax_x, seen)
        return Fp8Operand(g8, st.scale_x)
    # dynamic (or delayed before its first sync): an amax pass, then the cast
    _, seen = swiglu_kernel.swiglu_cast(h1, h3, h1.new_ones((), dtype=torch.float32), cfg.target_dtype,
                                        store=False, amax=True)
    if record:
        _record(st.amax_x, seen)
    scale = amax_to_scale(seen, cfg.target_dtype, plan.config.round_scales_to_power_of_2)
    g8, _ = swiglu_kernel.swiglu_cast(h1, h3, scale, cfg.target_dtype)
    return Fp8Operand(g8, scale)


def _swiglu_backward_cast(
    dg: torch.Tensor, h1: torch.Tensor, h3: torch.Tensor, g_scale: torch.Tensor, plan: _SwiGLUPlan,
    s1: _LayerState, s3: _LayerState,
) -> tuple[Fp8Operand | None, Fp8Operand | None, Fp8Operand | None]:
    """``(dh1_8, dh3_8, g8)``: the SwiGLU gradients cast as the gate/up layers cast their
    grad_output (in the layouts their GEMMs take), and ``g`` column-major with the forward's scale,
    ``None`` for what no GEMM needs."""
    p1, p3, p2 = plan.gate, plan.up, plan.down
    cfg = p1.config.cast_config_grad_output
    g_dtype = p2.config.cast_config_input.target_dtype
    rows, cols1, cols3, g_t = p1.need_grad_input, p1.need_grad_weight, p3.need_grad_weight, p2.need_grad_weight
    if not (plan.kernel and swiglu_kernel.fits(dg, h1, h3)):
        d1, d3 = swiglu_kernel.swiglu_backward_reference(dg, h1, h3)
        dh1 = _cast(d1, cfg, GRAD_OUTPUT, -1, p1, s1.scale_go, s1.amax_go) if rows or cols1 else None
        dh3 = _cast(d3, cfg, GRAD_OUTPUT, -1, p3, s3.scale_go, s3.amax_go) if rows or cols3 else None
        g8 = None
        if g_t:  # cast the transpose straight into the layout the grad_weight GEMM takes
            g = swiglu_kernel.swiglu_reference(h1, h3)
            g8 = Fp8Operand(saturated_cast(g.t(), g_scale, g_dtype).contiguous().t(), g_scale)
        return dh1, dh3, g8
    # a gradient no GEMM takes is not recorded either: run as layers, that layer's backward never runs
    rec1 = s1.amax_go is not None and p1.record_grad_amax and (rows or cols1)
    rec3 = s3.amax_go is not None and p3.record_grad_amax and (rows or cols3)
    delayed = cfg.scaling_type is ScalingType.DELAYED and s1.scale_go is not None and s3.scale_go is not None
    layouts = dict(rows=rows, transposed=cols1 or cols3, g_transposed=g_t)
    if delayed and p1.use_stored_scales and p3.use_stored_scales:
        sc1, sc3 = s1.scale_go, s3.scale_go
        out = swiglu_kernel.swiglu_backward_cast(
            dg, h1, h3, scale_g=g_scale, scale_dh1=sc1, scale_dh3=sc3, g_dtype=g_dtype,
            grad_dtype=cfg.target_dtype, amax=rec1 or rec3, **layouts)
    else:  # dynamic (or delayed before its first sync): an amax pass, then the casts
        one = h1.new_ones((), dtype=torch.float32)
        seen = swiglu_kernel.swiglu_backward_cast(
            dg, h1, h3, scale_g=one, scale_dh1=one, scale_dh3=one, g_dtype=g_dtype, grad_dtype=cfg.target_dtype,
            rows=False, transposed=False, g_transposed=False, amax=True)
        pow2 = p1.config.round_scales_to_power_of_2
        sc1, sc3 = (amax_to_scale(a, cfg.target_dtype, pow2) for a in seen[5:])
        out = swiglu_kernel.swiglu_backward_cast(
            dg, h1, h3, scale_g=g_scale, scale_dh1=sc1, scale_dh3=sc3, g_dtype=g_dtype,
            grad_dtype=cfg.target_dtype, **layouts)
        out = out[:5] + seen[5:]
    d1, d1_t, d3, d3_t, gt, a1, a3 = out
    if rec1:
        _record(s1.amax_go, a1)
    if rec3:
        _record(s3.amax_go, a3)

    def operand(rows_: torch.Tensor | None, t: torch.Tensor | None, scale: torch.Tensor) -> Fp8Operand:
        if rows_ is None:  # only the transposed layout: data is its column-major view
            return Fp8Operand(t.t(), scale)
        return Fp8Operand(rows_, scale, None if t is None else t.t())

    dh1 = operand(d1, d1_t if cols1 else None, sc1) if rows or cols1 else None
    dh3 = operand(d3, d3_t if cols3 else None, sc3) if rows or cols3 else None
    return dh1, dh3, (Fp8Operand(gt.t(), g_scale) if g_t else None)


def _save(ops: list[Fp8Operand | None]) -> tuple[list[torch.Tensor | None], list[bool]]:
    flat, present = [], []
    for op in ops:
        present.append(op is not None)
        if op is not None:
            flat += [op.data, op.scale]
    return flat, present


class _Float8SwiGLUFn(torch.autograd.Function):
    """``down(silu(gate(x)) * up(x))`` with fp8 GEMMs; ``x`` is 2-D ``[M, D]``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, plan: _SwiGLUPlan,
        *state: torch.Tensor,
    ) -> torch.Tensor:
        p1, p3, p2 = plan.gate, plan.up, plan.down
        n1, n3, _ = plan.n_state
        s1 = _layer_state(state[:n1], p1)
        s3 = _layer_state(state[n1:n1 + n3], p3)
        s2 = _layer_state(state[n1 + n3:], p2)
        cdt = p1.compute_dtype
        need_dx, need_dg = p1.need_grad_input, p2.need_grad_input
        need_dw13 = p1.need_grad_weight or p3.need_grad_weight

        # x is cast once for the gate and up GEMMs (with the gate's stored scale when delayed); its
        # amax is recorded for both layers
        x8 = _cast(x, p1.config.cast_config_input, INPUT, -1, p1, s1.scale_x, s1.amax_x, cols=need_dw13)
        if s1.amax_x is not None and s3.amax_x is not None and p3.record_amax:
            s3.amax_x.copy_(torch.maximum(s3.amax_x, s1.amax_x))
        w1_8 = _weight_operand(w1, p1, s1.scale_w, s1.amax_w, s1.cache, cols=need_dx)
        w3_8 = _weight_operand(w3, p3, s3.scale_w, s3.amax_w, s3.cache, cols=need_dx)
        w2_8 = _weight_operand(w2, p2, s2.scale_w, s2.amax_w, s2.cache, cols=need_dg)

        # gate, up output: h = x @ W.T      [M,D] @ [D,F] -> [M,F]
        h1 = _gemm(x8, w1_8.t(), p1.mm.output, cdt, cdt)
        h3 = _gemm(x8, w3_8.t(), p3.mm.output, cdt, cdt)
        # SwiGLU, cast as down's input: g8 = fp8(silu(h1) * h3)
        g8 = _swiglu_cast(h1, h3, p2, s2, plan.kernel)
        # down output: y = g @ W2.T          [M,F] @ [F,D] -> [M,D]
        y = _gemm(g8, w2_8.t(), p2.mm.output, cdt, cdt)
        if _LINK_INPUTS_TO_OUTPUT:  # see linear.py: torch 2.11's dynamo needs a differentiable link
            y = y + (_link(x) + _link(w1) + _link(w3) + _link(w2)).to(y.dtype)

        need_h = need_dg or p2.need_grad_weight
        ops = [_column_major(x8) if need_dw13 else None,
               _column_major(w1_8) if need_dx else None,
               _column_major(w3_8) if need_dx else None,
               _column_major(w2_8) if need_dg else None]
        flat, ctx.present = _save(ops)
        ctx.save_for_backward(*flat, h1 if need_h else None, h3 if need_h else None, g8.scale,
                              s1.amax_go, s1.scale_go, s3.amax_go, s3.scale_go, s2.amax_go, s2.scale_go)
        ctx.plan = plan
        ctx.n_state = len(state)
        ctx.dtypes = (x.dtype, w1.dtype, w3.dtype, w2.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        x_keep, w1_keep, w3_keep, w2_keep = (Fp8Operand(saved.pop(0), saved.pop(0)) if p else None
                                             for p in ctx.present)
        h1, h3, g_scale = saved[:3]
        bufs = saved[3:]
        if not torch.compiler.is_compiling():
            # update amax buffers through .data (see linear.py: a layer applied twice in one step)
            bufs = [b.data if b is not None else None for b in bufs]
        s1, s3, s2 = (_LayerState(None, None, bufs[2 * i], None, None, bufs[2 * i + 1], ()) for i in range(3))
        plan: _SwiGLUPlan = ctx.plan
        p1, p3, p2 = plan.gate, plan.up, plan.down
        cdt = p1.compute_dtype
        x_dtype, w1_dtype, w3_dtype, w2_dtype = ctx.dtypes
        need_dx, need_dg = p1.need_grad_input, p2.need_grad_input
        need_dw1, need_dw3, need_dw2 = p1.need_grad_weight, p3.need_grad_weight, p2.need_grad_weight
        dy = dy.contiguous()
        dy8 = _cast(dy, p2.config.cast_config_grad_output, GRAD_OUTPUT, -1, p2, s2.scale_go, s2.amax_go,
                    rows=need_dg or not need_dw2, cols=need_dw2)

        dh1 = dh3 = g8 = None
        if need_dg:
            # down grad_input: dg = dy @ W2      [M,D] @ [D,F] -> [M,F]
            dg = _gemm(dy8, w2_keep, p2.mm.grad_input, cdt, cdt)
            # SwiGLU backward with the casts of dh1, dh3 and of g (recomputed) in one pass
            dh1, dh3, g8 = _swiglu_backward_cast(dg, h1, h3, g_scale, plan, s1, s3)
        elif need_dw2:
            g = swiglu_kernel.swiglu_reference(h1, h3)
            g_dtype = p2.config.cast_config_input.target_dtype
            g8 = Fp8Operand(saturated_cast(g.t(), g_scale, g_dtype).contiguous().t(), g_scale)

        grad_x = grad_w1 = grad_w3 = grad_w2 = None
        if need_dw2:
            # down grad_weight: dW2 = dy.T @ g   [D,M] @ [M,F] -> [D,F]
            grad_w2 = _gemm(dy8.t(), g8, p2.mm.grad_weight, w2_dtype, cdt)
        if need_dx:
            # gate, up grad_input: dx = dh1 @ W1 + dh3 @ W3     [M,F] @ [F,D] -> [M,D]
            grad_x = _gemm(dh1, w1_keep, p1.mm.grad_input, x_dtype, cdt) + _gemm(
                dh3, w3_keep, p3.mm.grad_input, x_dtype, cdt)
        if need_dw1:
            # gate grad_weight: dW1 = dh1.T @ x  [F,M] @ [M,D] -> [F,D]
            grad_w1 = _gemm(dh1.t(), x_keep, p1.mm.grad_weight, w1_dtype, cdt)
        if need_dw3:
            # up grad_weight: dW3 = dh3.T @ x    [F,M] @ [M,D] -> [F,D]
            grad_w3 = _gemm(dh3.t(), x_keep, p3.mm.grad_weight, w3_dtype, cdt)
        return (grad_x, grad_w1, grad_w3, grad_w2, None) + (None,) * ctx.n_state


class Float8SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` over three ``Float8Linear`` layers, run as one fused autograd
    function where it can be (module docstring), else layer by layer.

    Args:
        gate, up, down: the layers (gate and up ``D -> F``, down ``F -> D``), registered as children
            under ``names``.
        names: the attribute names of gate, up and down (``("w1", "w3", "w2")`` in Llama).
        order: the order to register the children in (that of the module this replaces, so
            ``named_modules()`` and state_dict order stay the same); default ``names``.

    Inputs ``[..., D]``, outputs ``[..., D]``. Set ``fused = False`` to always run layer by layer.

    Example:
        >>> cfg = Float8LinearConfig(emulate=True)
        >>> lin = lambda i, o: Float8Linear.from_float(nn.Linear(i, o, bias=False), cfg)
        >>> ffn = Float8SwiGLU(lin(64, 128), lin(64, 128), lin(128, 64))
        >>> ffn(torch.randn(2, 8, 64)).shape
        torch.Size([2, 8, 64])
    """

    def __init__(
        self, gate: nn.Module, up: nn.Module, down: nn.Module, names: tuple[str, str, str] = ("w1", "w3", "w2"),
        order: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__()
        if len(names) != 3 or len(set(names)) != 3 or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"Float8SwiGLU(names={names!r}) is invalid; valid: three distinct attribute names "
                             f"(gate, up, down)")
        if order is not None and sorted(order) != sorted(names):
            raise ValueError(f"Float8SwiGLU(order={order!r}) is invalid; valid: an ordering of names={names!r}")
        self._names = tuple(names)
        layers = dict(zip(names, (gate, up, down)))
        for n in order or names:
            self.add_module(n, layers[n])
        #: False runs the three layers one by one (the same computation, unfused).
        self.fused = True

    @property
    def gate(self) -> nn.Module:
        return getattr(self, self._names[0])

    @property
    def up(self) -> nn.Module:
        return getattr(self, self._names[1])

    @property
    def down(self) -> nn.Module:
        return getattr(self, self._names[2])

    def unfused_reason(self, x: torch.Tensor | None = None) -> str | None:
        """Why a call with input ``x`` would run layer by layer, or ``None`` if it runs fused."""
        layers = (self.gate, self.up, self.down)
        if not self.fused:
            return "fused=False"
        if not all(isinstance(m, Float8Linear) for m in layers):
            return "not all three layers are Float8Linear"
        if not all(m.fp8_enabled for m in layers):
            return "a layer runs in high precision (fp8_enabled=False)"
        if any(m.bias is not None for m in layers):
            return "a layer has a bias"
        if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in layers):
            return "a layer has module hooks (fp8 statistics measure layers one by one)"
        if any(isinstance(m.weight, DTensor) for m in layers) or isinstance(x, (DTensor, Float8Tensor)):
            return "DTensor weights or an fp8 input (tensor parallel; or FSDP2 outside its forward, while sharded)"
        if not (self.gate.config == self.up.config == self.down.config):
            return "the three layers' configs differ"
        if not fusable_config(self.gate.config):
            return "the recipe's casts are not tensorwise and the same in forward and backward"
        g, u, d = (m.weight.shape for m in layers)
        if g != u or d[1] != g[0]:
            return f"shapes do not chain: gate {tuple(g)}, up {tuple(u)}, down {tuple(d)}"
        if x is not None and x.shape[-1] != g[1]:
            return f"input has {x.shape[-1]} features, gate takes {g[1]}"
        if self.gate.config.cast_kernel == "triton" and x is not None and not cast_kernel.supports(x.device):
            return "cast_kernel='triton' on a device without the kernel (the layers raise the error)"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unfused_reason(x) is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        gate, up, down = self.gate, self.up, self.down
        p1 = gate._plan(x, gate.weight)
        p3 = up._plan(x, up.weight)
        need_dg = torch.is_grad_enabled() and (x.requires_grad or gate.weight.requires_grad or up.weight.requires_grad)
        p2 = dataclasses.replace(down._plan(x, down.weight), need_grad_input=need_dg)
        states = [m._state(p) for m, p in ((gate, p1), (up, p3), (down, p2))]
        cfg = gate.config
        kernel = cfg.cast_kernel != "torch" and cast_kernel.supports(x.device)
        plan = _SwiGLUPlan(p1, p3, p2, tuple(len(s) for s in states), kernel)
        x2 = x.reshape(-1, x.shape[-1]).to(p1.compute_dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = _Float8SwiGLUFn.apply(x2, gate.weight, up.weight, down.weight, plan, *states[0], *states[1],
                                      *states[2])
        return y.reshape(*x.shape[:-1], down.weight.shape[0])

    def extra_repr(self) -> str:
        return f"gate={self._names[0]}, up={self._names[1]}, down={self._names[2]}, fused={self.fused}"


# --- which modules are SwiGLU feed-forwards ------------------------------------------------------
_SWIGLU_CLASSES: dict[type, tuple[str, str, str]] = {FeedForward: ("w1", "w3", "w2")}  # unfused built-in


def register_swiglu(cls: type, gate: str, up: str, down: str) -> None:
    """Declare that instances of ``cls`` compute ``down(silu(gate(x)) * up(x))`` with three
    ``nn.Linear`` children named ``gate``, ``up`` and ``down``, so that
    ``convert_to_float8_training(..., fuse_swiglu=...)`` may run them as ``Float8SwiGLU``.

    Conversion checks the claim on each module with a small input in eval mode (unless its weights
    are on the meta device) and raises if the module's output differs. A module with parameters,
    buffers or children of its own besides the three linears, or with module hooks, is left as it is.
    Declare only classes whose training-mode forward is that formula (no dropout). The module is
    replaced by a ``Float8SwiGLU`` holding the same three layers under the same names: code that
    checks ``isinstance(m, cls)`` no longer finds it, and global module hooks
    (``torch.nn.modules.module.register_module_forward_hook``) see the three layers only when the
    module runs them one by one.

    Example:
        >>> register_swiglu(LlamaMLP, gate="gate_proj", up="up_proj", down="down_proj")  # doctest: +SKIP
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"register_swiglu(cls={cls!r}) is invalid; valid: an nn.Module subclass")
    names = (gate, up, down)
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != 3:
        raise ValueError(f"register_swiglu(gate={gate!r}, up={up!r}, down={down!r}) is invalid; valid: three "
                         f"distinct attribute names")
    _SWIGLU_CLASSES[cls] = names


def swiglu_names(module: nn.Module) -> tuple[str, str, str] | None:
    """``(gate, up, down)`` names if ``module`` can be replaced by a ``Float8SwiGLU``: its class is a
    registered SwiGLU, its children are exactly the three linears, and it holds nothing the
    replacement would drop (own parameters or buffers, module hooks); else ``None``."""
    names = _SWIGLU_CLASSES.get(type(module))
    if names is None or not all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
        return None
    if {n for n, _ in module.named_children()} != set(names) or module._parameters or module._buffers:
        return None
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return None
    return names


def check_swiglu(module: nn.Module, names: tuple[str, str, str]) -> None:
    """Raise ``ValueError`` if ``module``'s forward is not ``down(silu(gate(x)) * up(x))`` (checked on
    4 random tokens without gradients; modules on the meta device are not checked)."""
    gate, up, down = (getattr(module, n) for n in names)
    w = gate.weight
    if w.is_meta:
        return
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            # a generator of its own: the check must not move the global RNG (init, dropout, data order)
            gen = torch.Generator(device=w.device).manual_seed(0)
            x = torch.randn(4, gate.in_features, device=w.device, generator=gen).to(w.dtype)
            got = module(x)
            want = down(F.silu(gate(x)) * up(x))
    finally:
        for m, mode in modes.items():
            m.training = mode
    err = (got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)
    if not torch.isfinite(err) or err > 1e-2:
        raise ValueError(
            f"{type(module).__name__} is registered as a SwiGLU with gate={names[0]!r}, up={names[1]!r}, "
            f"down={names[2]!r}, but its output differs from {names[2]}(silu({names[0]}(x)) * {names[1]}(x)) "
            f"(relative error {float(err):.3g}): fix the names given to register_swiglu, or pass "
            f"fuse_swiglu=False"
        )

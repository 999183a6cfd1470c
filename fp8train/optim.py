"""``AdamWFp8``: AdamW whose moments are stored in fp8 / bf16 — 3.03 bytes of state per parameter
instead of fp32 AdamW's 8 (2.06 with ``second_moment="fp8"``).

The update is ``torch.optim.AdamW``'s, computed in fp32; only the storage of the two moments between
steps changes (master weights stay the parameters themselves, fp32 under Lightning's mixed precision)::

    m, v  <- decode(stored m, stored v)                   # fp32 temporaries, one row chunk at a time
    m     <- beta1 * m + (1 - beta1) * g
    v     <- beta2 * v + (1 - beta2) * g**2
    p     <- p * (1 - lr * weight_decay)                   # decoupled weight decay
    p     <- p - lr / (1 - beta1**t) * m / (sqrt(v / (1 - beta2**t)) + eps)
    stored m, stored v <- encode(m, v)

Storage of a parameter with 2+ dims, seen as ``[R, C]`` rows of its last dimension:

==================  =========================================================  ======================
state               format                                                     bytes / param (block 128)
==================  =========================================================  ======================
``exp_avg``         e4m3, one fp32 scale per ``block_size`` elements of a row   1 + 4/128 = 1.03
                    (``exp_avg_scale``, ``[R, ceil(C / block_size)]``)
``exp_avg_sq``      ``"bf16"`` (default): bf16                                  2
                    ``"fp8"``: sqrt(v) in e4m3 with per-block scales            1.03
                    (``exp_avg_sq_scale``)
==================  =========================================================  ======================

Parameters with fewer than 2 dims (norm weights, biases; a negligible share of a transformer) and
parameters sharded along their last dimension keep fp32 moments, as ``torch.optim.AdamW``.

Why bf16 for v by default: v spans a wide range within a block and enters the update through
``1 / sqrt(v)``, so its relative error matters everywhere, not only near the block's maximum;
bf16 has 8 bits of mantissa against e4m3's 3. Both moments are written back with stochastic
rounding by default: with round-to-nearest, an EMA step smaller than half a unit in the last
place is lost (bf16 and ``beta2 = 0.999``: ``v`` stops decaying; e4m3 sqrt(v): any ``beta2 >=
0.9``). ``docs/OPTIMIZER.md`` has the measurements behind these choices.

FSDP2: parameters that are DTensors (``fully_shard``) get DTensor states with the parameter's
mesh and placements; the math runs on the local shard, and since blocks run along the (unsharded)
last dimension, the block scales shard with the rows. ``state_dict``/``load_state_dict`` and
``torch.distributed.checkpoint``'s ``get/set_optimizer_state_dict`` round trip them, resharding
included. A state dict of ``torch.optim.AdamW`` (fp32 moments) loads too: its moments are quantized.

On CUDA the update of each 2+ dim parameter is one Triton kernel (``fp8train.optim_kernel``:
every byte read and written once, no temporaries; ``fused=None`` picks it where it can run);
elsewhere it is the torch ops of ``_update_rows`` (``compile=True`` compiles them), one row
chunk at a time. Parameters with fp32 moments take ``torch.optim.AdamW``'s foreach update.

``step()`` reads no device value on the host: the step counters are CPU tensors, as in
``torch.optim.AdamW``'s default (for-loop) implementation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from itertools import chain
from typing import Any, Callable

import torch
from torch.distributed.tensor import DTensor

from fp8train import optim_kernel
from fp8train.blockwise import (
    E4M3,
    blockwise_scale_shape,
    dequantize_blockwise,
    quantize_blockwise_,
    round_to_bf16,
)

__all__ = ["AdamWFp8", "SECOND_MOMENT_FORMATS", "state_bytes_per_param"]

#: choices for ``AdamWFp8(second_moment=...)``
SECOND_MOMENT_FORMATS = ("bf16", "fp8")

# fp32 temporaries of the update are made for at most this many elements at a time (~5 live
# temporaries of 4 bytes: ~320 MiB), so the step's transient memory does not grow with the largest
# parameter (the 1.2B Llama's embedding has 67M elements)
_CHUNK_ELEMENTS = 1 << 24
_QUANTIZED_STATES = ("exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale")


def state_bytes_per_param(second_moment: str = "bf16", block_size: int = 128) -> float:
    """Optimizer-state bytes per parameter of a quantized (2+ dim) parameter; fp32 AdamW is 8."""
    m = 1 + 4 / block_size
    return m + (2 if second_moment == "bf16" else m)


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _check_hyperparameters(where: str, h: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming ``where``, the field, the value and what is valid."""

    def fail(name: str, valid: str) -> None:
        raise ValueError(f"{where}{name}={h[name]!r} is invalid; valid: {valid}")

    if not _is_number(h["lr"]) or h["lr"] < 0:
        fail("lr", "a finite number >= 0 (a float, not a tensor)")
    betas = h["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        fail("betas", "two numbers in [0, 1), e.g. (0.9, 0.95)")
    if not _is_number(h["eps"]) or h["eps"] <= 0:
        fail("eps", "a finite number > 0")
    if not _is_number(h["weight_decay"]) or h["weight_decay"] < 0:
        fail("weight_decay", "a finite number >= 0")
    bs = h["block_size"]
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        fail("block_size", "an integer >= 1 (elements per fp8 scale; 128 or 256 are typical)")
    if h["second_moment"] not in SECOND_MOMENT_FORMATS:
        fail("second_moment", f"one of {list(SECOND_MOMENT_FORMATS)}")
    if not isinstance(h["stochastic_rounding"], bool):
        fail("stochastic_rounding", "True or False")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _quantizable(p: torch.Tensor) -> bool:
    """2+ dims and the last dimension not sharded (block scales must shard with the rows)."""
    if p.dim() < 2:
        return False
    if isinstance(p, DTensor):
        last = p.dim() - 1
        return not any(pl.is_shard() and pl.dim % p.dim() == last for pl in p.placements)
    return True


def _zeros_like_sharded(p: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros of global ``shape`` laid out like ``p`` (a DTensor with p's mesh and placements when p is one)."""
    if not isinstance(p, DTensor):
        return torch.zeros(shape, dtype=dtype, device=p.device)
    local_shape = (*p.to_local().shape[:-1], shape[-1])
    local = torch.zeros(local_shape, dtype=dtype, device=p.to_local().device)
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


class AdamWFp8(torch.optim.Optimizer):
    """AdamW with the first moment in blockwise-scaled fp8 (e4m3) and the second in bf16 or fp8.

    A drop-in for ``torch.optim.AdamW`` (same hyperparameters, defaults and update); see the module
    docstring for the formats. Every hyperparameter can be set per parameter group.

    Args:
        params: parameters or parameter groups (dicts), as for any ``torch.optim.Optimizer``.
        lr: learning rate (>= 0; a float — schedulers set floats).
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: added to ``sqrt(v_hat)`` (> 0).
        weight_decay: decoupled weight decay coefficient (>= 0).
        block_size: elements per fp8 scale along a row (>= 1).
        second_moment: ``"bf16"`` (2 bytes/param) or ``"fp8"`` (sqrt(v) in e4m3, 1.03 bytes/param).
        stochastic_rounding: round the stored moments stochastically (unbiased) instead of to nearest.
        amsgrad: must be False (not supported).
        maximize: must be False (not supported).
        fused: the update of the fp8/bf16 states of GPU parameters as one Triton kernel per
            parameter (``fp8train.optim_kernel``: each byte read and written once). ``None``
            (default): wherever it runs (Triton installed, NVIDIA GPU of compute capability 8.9+);
            ``True``: required (fails at construction without Triton, at ``step()`` for a
            parameter elsewhere, before any update); ``False``: never (the torch path below).
        compile: ``torch.compile`` the torch path of the update (parameters the kernel does not
            take: CPU, or ``fused=False``); eager, it runs ~30 elementwise kernels per parameter.
            One compile per parameter shape until shapes go dynamic; a learning-rate schedule
            does not recompile.

    Raises:
        ValueError: a hyperparameter out of range, naming it, its value and what is valid;
            ``amsgrad``/``maximize`` set; ``fused=True`` without Triton; at ``step()``, a
            sparse or complex gradient, or (``fused=True``) a parameter the kernel cannot take.

    Example:
        >>> opt = AdamWFp8(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
        >>> loss.backward(); opt.step(); opt.zero_grad()
        >>> opt.state_bytes()["bytes_per_param"]   # ~3.03 for a transformer (fp32 AdamW: 8)
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        block_size: int = 128,
        second_moment: str = "bf16",
        stochastic_rounding: bool = True,
        amsgrad: bool = False,
        maximize: bool = False,
        fused: bool | None = None,
        compile: bool = False,
    ) -> None:
        if amsgrad is not False:
            raise ValueError(f"AdamWFp8(amsgrad={amsgrad!r}) is not supported; valid: False (use torch.optim.AdamW)")
        if maximize is not False:
            raise ValueError(
                f"AdamWFp8(maximize={maximize!r}) is not supported; valid: False (negate the loss instead)"
            )
        if not isinstance(compile, bool):
            raise ValueError(f"AdamWFp8: compile={compile!r} is invalid; valid: True or False")
        if fused not in (None, True, False):
            raise ValueError(f"AdamWFp8: fused={fused!r} is invalid; valid: None (auto), True or False")
        if fused and not optim_kernel.available():
            raise ValueError(
                "AdamWFp8: fused=True needs Triton, which is not importable here (it comes with torch's CUDA "
                "wheels); valid: fused=None (use the kernel where it can run) or fused=False"
            )
        self.fused = fused
        self._kernel_error: Exception | None = None  # set when the kernel failed under fused=None
        # one fused kernel set per parameter shape instead of ~30 elementwise kernels; the
        # scalars (lr, bias corrections) are tensor inputs, so a schedule does not recompile
        self._update_rows = torch.compile(_update_rows, fullgraph=True) if compile else _update_rows
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, block_size=block_size,
                        second_moment=second_moment, stochastic_rounding=stochastic_rounding)
        _check_hyperparameters("AdamWFp8: ", defaults)
        super().__init__(params, defaults)

    # --- hyperparameters -------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (its missing hyperparameters from the defaults), validating every value."""
        where = f"AdamWFp8 param_groups[{len(self.param_groups)}]: "
        for key in ("amsgrad", "maximize"):
            if param_group.get(key, False):
                raise ValueError(f"{where}{key}={param_group[key]!r} is not supported; valid: False")
        _check_hyperparameters(where, {**self.defaults, **param_group})
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["betas"] = tuple(float(b) for b in group["betas"])

    # --- state -----------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        state["step"] = torch.tensor(0.0, dtype=torch.float32)  # CPU: no host sync to read it
        if not _quantizable(p):
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return state
        scale_shape = blockwise_scale_shape(p.shape, group["block_size"])
        # row-major whatever p's layout (the kernel needs unit-stride rows)
        contiguous = torch.contiguous_format
        state["exp_avg"] = torch.zeros_like(p, dtype=E4M3, memory_format=contiguous)
        state["exp_avg_scale"] = _zeros_like_sharded(p, scale_shape, torch.float32)
        if group["second_moment"] == "bf16":
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=contiguous)
        else:
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=E4M3, memory_format=contiguous)
            state["exp_avg_sq_scale"] = _zeros_like_sharded(p, scale_shape, torch.float32)
        return state

    def state_bytes(self) -> dict[str, float]:
        """Bytes of optimizer state held by this process (local shards) and per local parameter element.

        Returns:
            ``{"state_bytes", "param_elements", "bytes_per_param"}``; the step counters (one CPU
            scalar per parameter) are not counted.
        """
        total, elements = 0, 0
        for group in self.param_groups:
            for p in group["params"]:
                elements += _local(p).numel()
                for key, t in self.state.get(p, {}).items():
                    if key != "step" and isinstance(t, torch.Tensor):
                        lt = _local(t)
                        total += lt.numel() * lt.element_size()
        return {"state_bytes": float(total), "param_elements": float(elements),
                "bytes_per_param": total / elements if elements else 0.0}

    # --- step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW step for every parameter with a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):  # every check before any update
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.is_complex():
                    raise ValueError(
                        f"AdamWFp8: param_groups[{i}] has a {'sparse gradient' if p.grad.is_sparse else 'complex parameter'}"
                        f"; valid: dense real-valued parameters and gradients"
                    )
                state = self.state.get(p)
                if state and "exp_avg_scale" in state:
                    _check_state_fits(p, state, group, f"AdamWFp8: param_groups[{i}]")
                if self.fused and _quantizable(p) and not optim_kernel.fits(p.shape[-1], group["block_size"]):
                    raise ValueError(
                        f"AdamWFp8(fused=True): param_groups[{i}] has block_size={group['block_size']} for rows of "
                        f"{p.shape[-1]} elements, more than the kernel holds; valid: a block_size <= "
                        f"{optim_kernel.MAX_BLOCK}, or fused=None / False"
                    )
                if self.fused and not optim_kernel.supports(_local(p).device):
                    raise ValueError(
                        f"AdamWFp8(fused=True): param_groups[{i}] has a parameter on {_local(p).device}; the kernel "
                        f"runs on NVIDIA GPUs of compute capability 8.9+ only; valid: move the model to such a GPU "
                        f"first, or fused=None (the kernel where it can run) / False"
                    )
        for group in self.param_groups:
            fp32_moments: dict[float, list[tuple[torch.Tensor, dict[str, Any]]]] = {}
            quantized: dict[float, list[tuple[torch.Tensor, dict[str, Any]]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p] if self.state.get(p) else self._init_state(p, group)
                state["step"] += 1
                t = float(state["step"].item())  # a CPU tensor: no device sync
                (quantized if "exp_avg_scale" in state else fp32_moments).setdefault(t, []).append((p, state))
            # parameters are updated together per step count (all of them, unless some went without
            # a gradient for a while): one set of scalars, a few multi-tensor calls
            for t, items in fp32_moments.items():
                self._update_fp32_moments(items, group, t)
            for t, items in quantized.items():
                self._update_quantized(items, group, t)
        return loss

    @staticmethod
    def _scalars(group: dict[str, Any], t: float) -> dict[str, float]:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        return dict(decay=1 - lr * group["weight_decay"], one_minus_beta1=1 - beta1, beta2=beta2,
                    one_minus_beta2=1 - beta2, step_size=lr / (1 - beta1**t), bc2_sqrt=math.sqrt(1 - beta2**t),
                    eps=group["eps"])

    def _update_fp32_moments(self, items: list[tuple[torch.Tensor, dict[str, Any]]], group: dict[str, Any],
                             t: float) -> None:
        """torch.optim.AdamW's update (its foreach form) for parameters with fp32 moments."""
        s = self._scalars(group, t)
        params = [_local(p) for p, _ in items]
        m = [_local(st["exp_avg"]) for _, st in items]
        v = [_local(st["exp_avg_sq"]) for _, st in items]
        g = [_local(p.grad).to(mi.dtype) for (p, _), mi in zip(items, m)]
        torch._foreach_mul_(params, s["decay"])
        torch._foreach_lerp_(m, g, s["one_minus_beta1"])
        torch._foreach_mul_(v, s["beta2"])
        torch._foreach_addcmul_(v, g, g, value=s["one_minus_beta2"])
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, s["bc2_sqrt"])
        torch._foreach_add_(denom, s["eps"])
        torch._foreach_addcdiv_(params, m, denom, value=-s["step_size"])

    def _update_quantized(self, items: list[tuple[torch.Tensor, dict[str, Any]]], group: dict[str, Any],
                          t: float) -> None:
        """The fp8/bf16-moment update of ``items``, one ``[rows, C]`` row chunk at a time: the Triton
        kernel where it runs (``_use_kernel``), else the torch ops of ``_update_rows``."""
        scalars = self._scalars(group, t)
        hyper = None  # the torch path's scalars, made on first use
        block, sr = group["block_size"], group["stochastic_rounding"]
        plan = [(p, state, self._use_kernel(p, state, block)) for p, state in items if _local(p).numel()]
        seeds: dict[torch.device, torch.Tensor] = {}
        if sr:  # one draw of seeds per device and step (a device tensor: no host sync), one per launch
            launches: dict[torch.device, int] = {}
            for p, _, kernel in plan:
                if kernel:
                    d = _local(p).device
                    launches[d] = launches.get(d, 0) + len(_row_chunks(_local(p)))
            seeds = {d: torch.randint(0, 2**63 - 1, (n,), device=d, dtype=torch.int64) for d, n in launches.items()}
        used: dict[torch.device, int] = {}
        for p, state, kernel in plan:
            kernel = kernel and self._kernel_error is None  # it may have failed on an earlier parameter
            param = _local(p)
            cols = param.shape[-1]
            rows = param.numel() // cols
            # updated in place, or in a contiguous copy (the kernel needs rows of unit stride) copied back
            p2 = param.view(rows, cols) if param.is_contiguous() else param.contiguous().view(rows, cols)
            g2 = _local(p.grad).reshape(rows, cols)
            if kernel and g2.stride(-1) != 1:
                g2 = g2.contiguous()
            m8 = _local(state["exp_avg"]).view(rows, cols)
            ms = _local(state["exp_avg_scale"]).view(rows, -1)
            vs = _local(state["exp_avg_sq"]).view(rows, cols)
            vsc = _local(state["exp_avg_sq_scale"]).view(rows, -1) if "exp_avg_sq_scale" in state else None
            for s in _row_chunks(param):
                chunk = (p2[s], g2[s], m8[s], ms[s], vs[s], vsc[s] if vsc is not None else None)
                if kernel:
                    kernel = self._launch(chunk, scalars, block, sr, seeds.get(param.device), used, param.device)
                    if kernel:
                        continue
                if hyper is None:
                    # 0-dim CPU fp32 tensors (the value each kernel would take from a Python
                    # float): torch.compile makes them graph inputs, where torch 2.11 specialised
                    # Python floats and recompiled on every new learning rate until its recompile
                    # limit sent the update back to eager. A CUDA kernel reads a CPU scalar without
                    # a device sync.
                    hyper = tuple(torch.tensor(x, dtype=torch.float32) for x in scalars.values())
                self._update_rows(*chunk, *hyper, block=block, stochastic=sr)
            if p2.data_ptr() != param.data_ptr():
                param.copy_(p2.view_as(param))

    def _use_kernel(self, p: torch.Tensor, state: dict[str, Any], block: int) -> bool:
        """Whether ``p``'s update goes to the Triton kernel: allowed (``fused``), not failed before,
        a device it runs on, unit-stride state rows (a checkpoint may hold another layout) and a
        block it can hold in registers."""
        if self.fused is False or self._kernel_error is not None:
            return False
        param = _local(p)
        if not optim_kernel.supports(param.device) or not optim_kernel.fits(param.shape[-1], block):
            return False
        return all(_local(state[k]).stride(-1) == 1 for k in _QUANTIZED_STATES if k in state)

    def _launch(self, chunk: tuple[torch.Tensor | None, ...], scalars: dict[str, float], block: int, sr: bool,
                seeds: torch.Tensor | None, used: dict[torch.device, int], device: torch.device) -> bool:
        """Run the kernel on one chunk; False (after a warning, once) if it failed to compile or launch
        under ``fused=None``, so that this chunk and the rest take the torch path."""
        try:
            with torch.cuda.device(device):  # Triton launches on the current device
                optim_kernel.adamw_fp8_update_(*chunk, **scalars, block=block, stochastic=sr, seeds=seeds,
                                               seed_index=used.get(device, 0))
        except Exception as e:  # noqa: BLE001 - any compile/launch failure falls back under fused=None
            if self.fused:
                raise
            self._kernel_error = e
            warnings.warn(f"AdamWFp8: the Triton update kernel failed ({type(e).__name__}: {e}); this optimizer "
                          f"uses its torch path from now on (fused=False silences this)", stacklevel=4)
            return False
        used[device] = used.get(device, 0) + 1
        return True

    # --- checkpoints -----------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of ``AdamWFp8`` (bit-exact) or of ``torch.optim.AdamW`` (moments quantized).

        ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its
        parameter's dtype, which would turn fp8/bf16 moments into fp32 copies and, for bf16
        parameters, the fp32 block scales and moments into bf16: every tensor state but ``step`` is
        set aside before it runs and put back (moved to the parameter's device, dtype kept) after.

        Raises:
            ValueError: a quantized state whose shape does not fit this optimizer's ``block_size``
                or ``second_moment`` (naming the group, parameter and setting).
        """
        kept, stripped_state = {}, {}
        for pid, entries in state_dict["state"].items():
            stripped_state[pid] = {k: v for k, v in entries.items() if k == "step" or not isinstance(v, torch.Tensor)}
            kept[pid] = {k: v for k, v in entries.items() if k not in stripped_state[pid]}
        super().load_state_dict({**state_dict, "state": stripped_state})
        for gi, group in enumerate(self.param_groups):  # a torch.optim.AdamW group lacks our settings
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            where = f"AdamWFp8.load_state_dict: param_groups[{gi}]: "
            for key in ("amsgrad", "maximize"):
                if group.get(key, False):
                    raise ValueError(f"{where}{key}={group[key]!r} is not supported; valid: False")
            _check_hyperparameters(where, group)
            group["betas"] = tuple(float(b) for b in group["betas"])
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            if pid not in kept:
                continue
            state = self.state[p]
            state.update({k: v.to(device=p.device) for k, v in kept[pid].items()})
            state["step"] = state["step"].to("cpu", torch.float32)  # from a fused/capturable AdamW too
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if self.state.get(p):
                    self._adopt_state(p, self.state[p], group, f"param_groups[{gi}].params[{pi}]")

    def _adopt_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], where: str) -> None:
        """Check a loaded state against this optimizer's formats; quantize fp32 (AdamW) moments."""
        if not _quantizable(p) or "exp_avg" not in state:
            return
        if state["exp_avg"].dtype == p.dtype and "exp_avg_scale" not in state:  # from torch.optim.AdamW
            m, v = state.pop("exp_avg"), state.pop("exp_avg_sq")
            step = state["step"]
            self._init_state(p, group)
            state["step"] = step
            cols = p.shape[-1]
            lp = _local(p)
            rows = lp.numel() // cols if lp.numel() else 0
            quantize_blockwise_(_local(m).reshape(rows, cols).float(), _local(state["exp_avg"]).view(rows, cols),
                                _local(state["exp_avg_scale"]).view(rows, -1), group["block_size"])
            _store_v(_local(v).reshape(rows, cols).float(), _local(state["exp_avg_sq"]).view(rows, cols),
                     _local(state["exp_avg_sq_scale"]).view(rows, -1) if "exp_avg_sq_scale" in state else None,
                     group["block_size"], stochastic=False)
            return
        _check_state_fits(p, state, group, f"AdamWFp8.load_state_dict: {where}", fix="build it with the saved settings")
        for key in ("exp_avg", "exp_avg_sq"):  # an older checkpoint may hold another layout
            if not state[key].is_contiguous():
                state[key] = state[key].contiguous()


def _check_state_fits(p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], where: str,
                      fix: str = "keep the block_size and second_moment the state was made with") -> None:
    """Raise ``ValueError`` when ``state``'s quantized moments do not match the group's ``block_size``
    and ``second_moment`` (a setting changed after the first step, or a checkpoint of other settings)."""
    want_scale = blockwise_scale_shape(p.shape, group["block_size"])
    got_v = "fp8" if "exp_avg_sq_scale" in state else "bf16"
    if tuple(state["exp_avg_scale"].shape) != want_scale or got_v != group["second_moment"]:
        raise ValueError(
            f"{where} (parameter shape {tuple(p.shape)}): the state has exp_avg_scale of shape "
            f"{tuple(state['exp_avg_scale'].shape)} and second_moment={got_v!r}; the group has "
            f"block_size={group['block_size']} (scale shape {want_scale}) and "
            f"second_moment={group['second_moment']!r}: {fix}"
        )


def _row_chunks(param: torch.Tensor) -> list[slice]:
    """Row slices of ``param`` seen as ``[rows, C]``, at most ``_CHUNK_ELEMENTS`` elements each
    (one row at least): the unit of one kernel launch or one torch-path call."""
    cols = param.shape[-1]
    rows = param.numel() // cols
    step = max(1, _CHUNK_ELEMENTS // cols)
    return [slice(r, r + step) for r in range(0, rows, step)]  # shapes only: no data-dependent branch


def _store_v(v: torch.Tensor, out: torch.Tensor, out_scale: torch.Tensor | None, block: int, stochastic: bool) -> None:
    """Write fp32 ``v`` (>= 0) into its storage: bf16, or sqrt(v) in blockwise e4m3 when ``out_scale`` is given."""
    if out_scale is None:
        out.copy_(round_to_bf16(v, stochastic))
    else:
        quantize_blockwise_(v.sqrt(), out, out_scale, block, stochastic)


def _update_rows(
    p: torch.Tensor, g: torch.Tensor, m8: torch.Tensor, m_scale: torch.Tensor, v_store: torch.Tensor,
    v_scale: torch.Tensor | None, decay: torch.Tensor, one_minus_beta1: torch.Tensor, beta2: torch.Tensor,
    one_minus_beta2: torch.Tensor, step_size: torch.Tensor, bc2_sqrt: torch.Tensor, eps: torch.Tensor, *,
    block: int, stochastic: bool,
) -> None:
    """The AdamW update of ``[rows, C]`` views, in place: ``p`` (any float dtype), gradient ``g``,
    stored moments ``m8``/``m_scale`` and ``v_store``/``v_scale`` (``None``: bf16 v). The
    hyperparameters are 0-dim fp32 tensors: ``decay = 1 - lr * weight_decay``,
    ``step_size = lr / (1 - beta1**t)``, ``bc2_sqrt = sqrt(1 - beta2**t)``."""
    g = g.float()
    m = dequantize_blockwise(m8, m_scale, block)
    m.add_((g - m).mul_(one_minus_beta1))  # lerp(m, g, 1 - beta1), as torch.optim.AdamW
    v = v_store.float() if v_scale is None else dequantize_blockwise(v_store, v_scale, block).square_()
    v.mul_(beta2).addcmul_(g, g * one_minus_beta2)
    quantize_blockwise_(m, m8, m_scale, block, stochastic)
    _store_v(v, v_store, v_scale, block, stochastic)
    # this step's update uses the fp32 moments; the rounded ones carry over to the next step
    update = m.div_(v.sqrt_().div_(bc2_sqrt).add_(eps)).mul_(step_size)
    if p.dtype == torch.float32:
        p.mul_(decay).sub_(update)
    else:
        p.copy_(p.float().mul_(decay).sub_(update))

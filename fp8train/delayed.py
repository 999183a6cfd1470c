"""Delayed scaling: per-layer amax history and scale buffers, and their once-per-step sync.

State of one layer, per operand role ``r`` in (input, weight, grad_output), all registered buffers
(so they are in ``state_dict`` and checkpoints):

* ``fp8_amax_{r}``          0-dim fp32: running max of |operand| since the last sync (max over
  micro-batches, so gradient accumulation sees every micro-batch).
* ``fp8_amax_history_{r}``  ``[history_len]`` fp32: amax of past steps, newest first.
* ``fp8_scale_{r}``         0-dim fp32: the scale casts use until the next sync.
* ``fp8_nonfinite_{r}``     0-dim int64: syncs skipped because the amax was NaN/inf.

Casts read ``fp8_scale_{r}`` and write ``fp8_amax_{r}`` with in-place ops on these buffers, which
``torch.compile`` traces (also in backward), so a compiled step never recompiles as scales change.

``sync_float8_amax_and_scale_history`` runs once per optimizer step (after the last micro-batch's
backward): it stacks every layer's state, all-reduces amax with MAX across ranks, rolls the
histories, recomputes scales and writes everything back with ``torch._foreach_copy_`` — a fixed
number of kernels whatever the layer count. A non-finite amax leaves that operand's history and
scale untouched and increments its ``fp8_nonfinite_{r}`` counter.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from fp8train.config import Float8LinearConfig, GemmInputRole
from fp8train.scaling import EPS, floor_pow2, fp8_max, tensor_amax

__all__ = ["ROLES", "register_delayed_buffers", "record_amax", "sync_float8_amax_and_scale_history"]

ROLES: tuple[str, ...] = tuple(r.value for r in GemmInputRole)  # input, weight, grad_output
_STATE = ("amax", "amax_history", "scale", "nonfinite")


def register_delayed_buffers(module: nn.Module, config: Float8LinearConfig, device: torch.device | str) -> None:
    """Add delayed-scaling buffers for all three roles to ``module`` (idempotent)."""
    n = config.delayed_scaling.history_len
    for r in ROLES:
        module.register_buffer(f"fp8_amax_{r}", torch.zeros((), device=device))
        module.register_buffer(f"fp8_amax_history_{r}", torch.zeros(n, device=device))
        module.register_buffer(f"fp8_scale_{r}", torch.ones((), device=device))
        module.register_buffer(f"fp8_nonfinite_{r}", torch.zeros((), dtype=torch.int64, device=device))
    # Python flag: until the first sync, delayed operands are cast with dynamic scales (there is
    # no history yet). It flips once, so torch.compile recompiles at most once for it.
    module.is_amax_initialized = False


def record_amax(amax_buffer: torch.Tensor, x: torch.Tensor) -> None:
    """``amax_buffer = max(amax_buffer, amax(x))`` in place (NaN propagates into the buffer)."""
    new = tensor_amax(x)
    # torch.maximum propagates NaN, so a NaN operand is seen by the sync and skipped there
    amax_buffer.copy_(torch.maximum(amax_buffer, new))


def _delayed_layers(model: nn.Module) -> Iterable[nn.Module]:
    for m in model.modules():
        if getattr(m, "is_amax_initialized", None) is not None and hasattr(m, "fp8_amax_history_input"):
            yield m


def _group_key(cfg: Float8LinearConfig) -> tuple[Any, ...]:
    d = cfg.delayed_scaling
    dtypes = (cfg.cast_config_input.target_dtype, cfg.cast_config_weight.target_dtype,
              cfg.cast_config_grad_output.target_dtype)
    return (d.history_len, d.amax_compute_algo, float(d.margin), cfg.round_scales_to_power_of_2, dtypes)


def _buffers(layers: list[nn.Module], kind: str) -> list[torch.Tensor]:
    return [getattr(m, f"fp8_{kind}_{r}") for m in layers for r in ROLES]


@torch.no_grad()
def sync_float8_amax_and_scale_history(model: nn.Module, process_group: Any = None) -> None:
    """Fold the amax seen since the last sync into every delayed layer's history and scale.

    Call once per optimizer step, after the last micro-batch's backward and before
    ``optimizer.step()`` (the Lightning callback does this for you). With ``torch.distributed``
    initialised, amax is all-reduced with MAX over ``process_group`` (default: the world), so every
    rank ends with identical scales.
    """
    groups: dict[tuple[Any, ...], list[nn.Module]] = defaultdict(list)
    for m in _delayed_layers(model):
        groups[_group_key(m.config)].append(m)
    for key, layers in groups.items():
        _sync_group(layers, key, process_group)
        for m in layers:
            m.is_amax_initialized = True


_MAXES: dict[tuple[Any, ...], torch.Tensor] = {}


def _fp8_maxes(dtypes: tuple[torch.dtype, ...], device: torch.device) -> torch.Tensor:
    # Built once per device: torch.tensor(list, device="cuda") copies from pageable host memory,
    # which synchronises the host with the GPU — a stall on every optimizer step.
    key = (dtypes, device)
    if key not in _MAXES:
        _MAXES[key] = torch.tensor([fp8_max(d) for d in dtypes], device=device)
    return _MAXES[key]


def _sync_group(layers: list[nn.Module], key: tuple[Any, ...], process_group: Any) -> None:
    history_len, algo, margin, pow2, dtypes = key
    n_layers = len(layers)
    amax_bufs, hist_bufs = _buffers(layers, "amax"), _buffers(layers, "amax_history")
    scale_bufs, count_bufs = _buffers(layers, "scale"), _buffers(layers, "nonfinite")

    amax = torch.stack(amax_bufs).view(n_layers, 3)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        # NaN under a MAX all-reduce is backend-dependent; inf is not, so every rank skips alike.
        amax = torch.where(torch.isnan(amax), torch.full_like(amax, float("inf")), amax)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=process_group)
    history = torch.stack(hist_bufs).view(n_layers, 3, history_len)
    old_scale = torch.stack(scale_bufs).view(n_layers, 3)

    finite = torch.isfinite(amax)
    # amax == 0 means the operand was not seen since the last sync (e.g. no backward ran):
    # keep the old history rather than record a zero.
    update = finite & (amax > 0)
    rolled = torch.cat([amax.unsqueeze(-1), history[..., :-1]], dim=-1)
    history = torch.where(update.unsqueeze(-1), rolled, history)
    effective = history.amax(dim=-1) if algo == "max" else history[..., 0]
    maxes = _fp8_maxes(dtypes, amax.device)
    scale = maxes / torch.clamp(effective, min=EPS) / (2.0**margin)
    if pow2:
        scale = floor_pow2(scale)
    scale = torch.where(update, scale, old_scale)
    counts = torch.stack(count_bufs).view(n_layers, 3) + (~finite).to(torch.int64)

    torch._foreach_copy_(hist_bufs, list(history.view(n_layers * 3, history_len).unbind(0)))
    torch._foreach_copy_(scale_bufs, list(scale.view(-1).unbind(0)))
    torch._foreach_copy_(count_bufs, list(counts.view(-1).unbind(0)))
    torch._foreach_zero_(amax_bufs)

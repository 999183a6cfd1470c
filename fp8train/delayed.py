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
backward): it all-reduces amax with MAX across ranks, rolls the histories and recomputes scales. On
a CUDA device with Triton that is one kernel launch for all layers (``fp8train.sync_kernel``,
through a table of the buffers' addresses; two launches around the all-reduce); elsewhere torch ops
on stacked copies written back with ``torch._foreach_copy_``: a fixed number of kernels whatever
the layer count. Which layers and buffers to update is looked up once per model and kept (the
"plan") while the model's delayed layers, their configs and their buffers' storage stay the same,
checked at every sync: the host time of a sync is the walk over the modules and that check.
A non-finite amax leaves that operand's history and scale untouched and increments its
``fp8_nonfinite_{r}`` counter.

Which ranks the MAX covers: every rank that holds a piece of an operand must take part, so that
all of them cast with the scale of the whole tensor. The default (the world) covers data
parallelism (each rank sees other tokens), FSDP2 (with fp8 all-gather each rank records its
weight shard's amax) and tensor parallelism (each rank records its shard of weight, activation
or gradient), in any combination (2-D DP x TP meshes included). Pass a ``DeviceMesh`` to reduce
over exactly its ranks (one all-reduce per mesh dimension), e.g. under pipeline parallelism,
where stages hold different layers and a world-wide all-reduce of per-stage stacks would not
match up.

Loading a state dict (``load_state_dict``, DCP's ``set_model_state_dict``) marks a layer as synced
when its loaded amax history holds a value, so a resumed run casts with the loaded scales at once.

Until its first sync a layer has no history and casts with dynamic scales; under ``torch.compile``
that is a different graph, so a compiled model compiles twice (once for the first step, again
after the first sync). ``eager_until_synced(model)`` runs the steps before the first sync without
compiling, so the model compiles once (``Float8Training(eager_until_synced=True)`` in Lightning);
the eager steps need more memory than compiled ones.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from fp8train import cast_kernel, sync_kernel
from fp8train.config import Float8LinearConfig, GemmInputRole
from fp8train.scaling import EPS, floor_pow2, fp8_max, tensor_amax

__all__ = ["ROLES", "register_delayed_buffers", "record_amax", "sync_float8_amax_and_scale_history",
           "delayed_scales_pending", "eager_until_synced"]

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
    if not getattr(module, "_fp8train_delayed_load_hook", False):
        module.register_load_state_dict_post_hook(_mark_synced_after_load)
        module._fp8train_delayed_load_hook = True


def _mark_synced_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    """A loaded amax history means the layer was synced before (``is_amax_initialized``)."""
    hist = [_local(getattr(module, f"fp8_amax_history_{r}", None)) for r in ROLES]
    if all(h is not None and not h.is_meta for h in hist):
        module.is_amax_initialized = bool(torch.stack([h.ne(0).any() for h in hist]).any())  # host sync, at load only


def record_amax(amax_buffer: torch.Tensor, x: torch.Tensor) -> None:
    """``amax_buffer = max(amax_buffer, amax(x))`` in place (NaN propagates into the buffer)."""
    new = tensor_amax(x)
    # torch.maximum propagates NaN, so a NaN operand is seen by the sync and skipped there
    amax_buffer.copy_(torch.maximum(amax_buffer, new))


def _is_delayed(m: nn.Module) -> bool:
    # instance-dict and buffer-dict lookups: getattr on a module without the attribute raises
    # inside nn.Module.__getattr__, ~20x slower, and the sync asks this of every module every step
    return m.__dict__.get("is_amax_initialized") is not None and "fp8_amax_history_input" in m._buffers


def _delayed_layers(model: nn.Module) -> list[nn.Module]:
    """Delayed-scaling layers of ``model`` in ``model.modules()`` order (an explicit walk: half the
    host time of ``modules()``, paid at every sync)."""
    out, seen, stack = [], set(), [model]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if _is_delayed(m):
            out.append(m)
        stack.extend(reversed([c for c in m._modules.values() if c is not None]))
    return out


def _group_key(cfg: Float8LinearConfig) -> tuple[Any, ...]:
    d = cfg.delayed_scaling
    dtypes = (cfg.cast_config_input.target_dtype, cfg.cast_config_weight.target_dtype,
              cfg.cast_config_grad_output.target_dtype)
    return (d.history_len, d.amax_compute_algo, float(d.margin), cfg.round_scales_to_power_of_2, dtypes)


def _local(t: Any) -> Any:
    # PyTorch's TP styles replicate buffers as DTensors; the state is the local (= whole) tensor
    return t.to_local() if isinstance(t, DTensor) else t


# a layer's state buffers, kind-major: fp8_amax_input, fp8_amax_weight, ..., fp8_nonfinite_grad_output
_NAMES = tuple(f"fp8_{kind}_{r}" for kind in _STATE for r in ROLES)


@dataclass
class _Group:
    """Layers of one sync configuration (indices into the plan's layers) and their state buffers,
    row ``3 * layer + role`` of each kind."""

    key: tuple[Any, ...]
    index: list[int]
    bufs: dict[str, list[torch.Tensor]]
    kernel: bool  # fp8train.sync_kernel can update them (plain CUDA tensors on one device with Triton)
    meta: torch.Tensor | None = None  # the kernel's table of buffer addresses, uploaded at first use


@dataclass
class _Plan:
    """What the sync of one model works on, kept between steps while it still describes the model:
    the same delayed layers (held weakly: the plan lives as long as the model), configs, and buffer
    storage (checked by address every step)."""

    layers: list[weakref.ref[nn.Module]]
    configs: list[Float8LinearConfig]
    addresses: list[int]
    groups: list[_Group] = field(default_factory=list)


_PLANS: "weakref.WeakKeyDictionary[nn.Module, _Plan]" = weakref.WeakKeyDictionary()


_STATE_BUFFERS = operator.itemgetter(*_NAMES)


def _addresses(layers: list[nn.Module]) -> list[int]:
    buffers = list(itertools.chain.from_iterable(map(_STATE_BUFFERS, [m._buffers for m in layers])))
    out = list(map(torch.Tensor.data_ptr, buffers))
    if 0 in out:  # a DTensor's own data_ptr() is 0: its local tensor holds the state (meta tensors: 0 anyway)
        out = [(b._local_tensor if type(b) is DTensor else b).data_ptr() for b in buffers]
    return out


def _plain_cuda(bufs: dict[str, list[torch.Tensor]], history_len: int) -> bool:
    """True when ``sync_kernel`` can update these buffers in place: plain contiguous CUDA tensors on one
    device where Triton runs, of the dtypes and sizes it writes (``load_state_dict(assign=True)`` can
    bring others: the torch path takes them as they are), and nothing is tracing."""
    every = [b for kind in _STATE for b in bufs[kind]]
    dev = every[0].device
    if dev.type != "cuda" or not cast_kernel.supports(dev) or history_len > sync_kernel.MAX_HISTORY:
        return False
    want = {"amax": (torch.float32, 1), "amax_history": (torch.float32, history_len), "scale": (torch.float32, 1),
            "nonfinite": (torch.int64, 1)}
    return (all(b.device == dev and b.is_contiguous() for b in every)
            and all(b.dtype == want[k][0] and b.numel() == want[k][1] for k in _STATE for b in bufs[k])
            and cast_kernel.launches_directly(*every))


def _plan(model: nn.Module, layers: list[nn.Module]) -> _Plan:
    """The sync's plan for ``model`` with delayed ``layers``: rebuilt when a layer, its config or a
    buffer's storage changed (``model.to()``, ``load_state_dict(assign=True)``, a layer converted
    or its buffers re-registered), else reused, so that a step's sync does not look up 12 buffers per
    layer by name."""
    configs = [m.config for m in layers]
    addresses = _addresses(layers)
    plan = _PLANS.get(model)
    if (plan is not None and len(plan.layers) == len(layers) and all(r() is m for r, m in zip(plan.layers, layers))
            and all(map(operator.is_, plan.configs, configs)) and plan.addresses == addresses):
        return plan
    plan = _Plan([weakref.ref(m) for m in layers], configs, addresses, _groups(layers, kernel=True))
    _PLANS[model] = plan
    return plan


def _groups(layers: list[nn.Module], kernel: bool = False) -> list[_Group]:
    """``layers`` grouped by sync configuration, with their buffers (and whether ``sync_kernel``
    may update them, when ``kernel``)."""
    by_key: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for i, m in enumerate(layers):
        by_key[_group_key(m.config)].append(i)
    groups = []
    for key, index in by_key.items():
        bufs = {kind: [_local(layers[i]._buffers[f"fp8_{kind}_{r}"]) for i in index for r in ROLES]
                for kind in _STATE}
        groups.append(_Group(key, index, bufs, kernel and _plain_cuda(bufs, key[0])))
    return groups


@torch.no_grad()
def sync_float8_amax_and_scale_history(model: nn.Module, process_group: Any = None) -> None:
    """Fold the amax seen since the last sync into every delayed layer's history and scale.

    Call once per optimizer step, after the last micro-batch's backward and before
    ``optimizer.step()`` (the Lightning callback does this for you). With ``torch.distributed``
    initialised, amax is all-reduced with MAX over ``process_group`` (default: the world; a
    ``ProcessGroup``, or a ``DeviceMesh`` for all of its ranks), so every rank ends with identical
    scales: those of the whole tensor, however it is split across data-, FSDP- and
    tensor-parallel ranks (see the module docstring).

    On a CUDA device with Triton the whole update is one kernel launch for all layers of a
    configuration (``fp8train.sync_kernel``; two around the all-reduce); elsewhere a fixed number
    of torch ops, whatever the layer count.
    """
    layers = _delayed_layers(model)
    if not layers:
        return
    reduce_over = _reduction_groups(process_group)
    # traced (torch.compile, make_fx, fake tensors): no addresses to check or cache, plain torch ops
    groups = _plan(model, layers).groups if cast_kernel.launches_directly() else _groups(layers)
    for group in groups:
        if group.kernel:
            _sync_group_kernel(group, reduce_over)
        else:
            _sync_group(group.key, reduce_over, group.bufs)
        for i in group.index:
            if not layers[i].__dict__["is_amax_initialized"]:  # nn.Module.__setattr__ is slow: set it once
                layers[i].is_amax_initialized = True


def delayed_scales_pending(model: nn.Module) -> bool:
    """True while some delayed-scaling layer of ``model`` has not synced yet (it casts with dynamic
    scales until its first ``sync_float8_amax_and_scale_history`` or a loaded checkpoint)."""
    return any(not m.is_amax_initialized for m in _delayed_layers(model))


@contextlib.contextmanager
def eager_until_synced(model: nn.Module) -> Iterator[None]:
    """Run the body without ``torch.compile`` while ``model`` has delayed layers not yet synced.

    Wrap each training step (forward and backward) in it. The steps before the first sync cast with
    dynamic scales, which under ``torch.compile`` is a graph of its own: compiled, a model with
    delayed scaling would compile twice, the first graph for a single step. Inside this context
    those steps run eagerly (``torch.compiler.set_stance("force_eager")``) and the model compiles
    once, at the first step after the sync. Once every layer has synced it does nothing. An eager
    step holds more activation memory than a compiled one (no fusion): leave headroom for it.

    Example:
        >>> compiled = torch.compile(model)
        >>> for x, y in batches:
        ...     with fp8train.eager_until_synced(model):
        ...         loss_fn(compiled(x), y).backward()
        ...     fp8train.sync_float8_amax_and_scale_history(model)
        ...     optimizer.step(); optimizer.zero_grad()
    """
    if delayed_scales_pending(model):
        with torch.compiler.set_stance("force_eager"):
            yield
    else:
        yield


_MAXES: dict[tuple[Any, ...], torch.Tensor] = {}


def _fp8_maxes(dtypes: tuple[torch.dtype, ...], device: torch.device) -> torch.Tensor:
    # Built once per device: torch.tensor(list, device="cuda") copies from pageable host memory,
    # which synchronises the host with the GPU — a stall on every optimizer step.
    key = (dtypes, device)
    if key not in _MAXES:
        _MAXES[key] = torch.tensor([fp8_max(d) for d in dtypes], device=device)
    return _MAXES[key]


def _sync_group_kernel(group: _Group, reduce_over: list[Any]) -> None:
    history_len, algo, margin, pow2, dtypes = group.key
    if group.meta is None:  # uploaded once per plan (from pageable memory: the host waits for it once)
        host = [b.data_ptr() for kind in _STATE for b in group.bufs[kind]]
        group.meta = torch.tensor(host, dtype=torch.int64, device=group.bufs["amax"][0].device)
    rows = len(group.bufs["amax"])
    reduced = None
    if reduce_over:
        reduced = torch.empty(rows, dtype=torch.float32, device=group.meta.device)
        sync_kernel.gather_amax(group.meta, reduced)
        for pg in reduce_over:
            dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=pg)
    sync_kernel.apply(group.meta, rows, history_len=history_len, algo_max=algo == "max", margin=margin,
                      pow2=pow2, eps=EPS, fp8_maxes=tuple(fp8_max(d) for d in dtypes), reduced=reduced)
    # what torch's in-place ops would record: a backward that saved a scale or amax buffer (grad_output's)
    # still raises if the sync ran between its forward and it
    torch.autograd.graph.increment_version(group.bufs["amax"] + group.bufs["scale"])


def _sync_group(key: tuple[Any, ...], reduce_over: list[Any], bufs: dict[str, list[torch.Tensor]]) -> None:
    """The same update in torch ops on stacked copies of the buffers (any device)."""
    history_len, algo, margin, pow2, dtypes = key
    n_layers = len(bufs["amax"]) // 3
    amax_bufs, hist_bufs, scale_bufs, count_bufs = (bufs[k] for k in _STATE)

    amax = torch.stack(amax_bufs).view(n_layers, 3)
    if reduce_over:
        # NaN under a MAX all-reduce is backend-dependent; inf is not, so every rank skips alike.
        amax = torch.where(torch.isnan(amax), torch.full_like(amax, float("inf")), amax)
        for group in reduce_over:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
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


def _reduction_groups(process_group: Any) -> list[Any]:
    """The process groups to all-reduce over, one after the other (none when single-process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return []
    if isinstance(process_group, DeviceMesh):
        return [process_group.get_group(d) for d in range(process_group.ndim) if process_group.size(d) > 1]
    return [process_group] if dist.get_world_size(process_group) > 1 else []

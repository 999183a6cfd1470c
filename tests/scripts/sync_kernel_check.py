"""Run fp8train.sync_kernel against the torch path of the delayed sync: every buffer bit for bit,
for each history algorithm, margin and power-of-two setting, with NaN, inf and zero amaxes, with and
without an all-reduce, for two configurations in one model, and with a plan that must follow
buffers replaced by ``model.to()``. Under Triton's CPU interpreter by default (tests/test_delayed.py,
when Triton is installed); ``FP8_DEVICE=cuda`` runs the compiled kernel on a GPU instead (the GPU
test). Prints ``ok`` at the end."""

import copy
import os

DEVICE = os.environ.get("FP8_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import fp8train  # noqa: E402
from fp8train import delayed  # noqa: E402
from fp8train.config import DelayedScalingConfig  # noqa: E402

torch.manual_seed(0)


def model(cfg: fp8train.Float8LinearConfig, n: int = 5) -> nn.Module:
    m = nn.Sequential(*[nn.Linear(16, 16, bias=False, device=DEVICE) for _ in range(n)])
    return fp8train.convert_to_float8_training(m, config=cfg, auto_filter=False)


def fill(m: nn.Module, step: int) -> None:
    """Amaxes of one step: random, plus a NaN, an inf, and operands not seen (0)."""
    for i, layer in enumerate(delayed._delayed_layers(m)):
        for r, role in enumerate(delayed.ROLES):
            v = float(torch.rand(()) * 10 ** (4 * torch.rand(()) - 2))
            special = {(0, 0): float("nan"), (1, 1): float("inf"), (2, 2): 0.0, (3, 0): -float("inf")}
            getattr(layer, f"fp8_amax_{role}").fill_(special.get((i, r), v) if step % 2 else v)


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items() if "fp8_" in k}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        bits = (lambda t: t if t.dtype == torch.int64 else t.reshape(-1).view(torch.uint8))  # NaN == NaN here
        assert a[k].dtype == b[k].dtype and torch.equal(bits(a[k]), bits(b[k])), (k, a[k], b[k])


def run(m: nn.Module, kernel: bool, steps: int, all_reduce=None) -> list[dict[str, torch.Tensor]]:
    delayed._plain_cuda = (lambda *args: True) if kernel else (lambda *args: False)
    launches = []
    real_apply = delayed.sync_kernel.apply
    delayed.sync_kernel.apply = lambda *a, **k: (launches.append(1), real_apply(*a, **k))[1]
    out = []
    try:
        for step in range(steps):
            torch.manual_seed(step)
            fill(m, step)
            if all_reduce is not None:
                delayed._reduction_groups = lambda pg: ["group"]
                delayed.dist.all_reduce = all_reduce
            fp8train.sync_float8_amax_and_scale_history(m)
            out.append(state(m))
    finally:
        delayed.sync_kernel.apply = real_apply
    assert (len(launches) > 0) == kernel, (kernel, launches)
    return out


reduce_calls = []


def fake_all_reduce(t, op=None, group=None):
    """Another rank's amaxes: 3x ours in the first rows. NaN must arrive as inf (a MAX all-reduce of
    NaN is backend-dependent), on both paths."""
    assert not t.isnan().any(), "NaN reached the all-reduce"
    reduce_calls.append(t.shape)
    flat = t.view(-1)  # [layers, 3] on the torch path, [3 * layers] on the kernel's
    other = torch.zeros_like(flat)
    other[:4] = 3.0 * torch.nan_to_num(flat[:4], nan=0.0, posinf=0.0)
    flat.copy_(torch.maximum(flat, other))


# A fractional margin only on the GPU: torch on CUDA divides by 2**margin as a multiply by its fp32
# reciprocal (as the kernel does), torch on CPU divides; whole margins are exact either way.
configs = [
    fp8train.Float8LinearConfig.from_recipe_name("delayed"),
    fp8train.Float8LinearConfig.from_recipe_name("delayed", round_scales_to_power_of_2=True),
    fp8train.Float8LinearConfig.from_recipe_name(
        "delayed", delayed_scaling=DelayedScalingConfig(history_len=3, amax_compute_algo="most_recent", margin=1.0)),
    fp8train.Float8LinearConfig.from_recipe_name(
        "delayed", delayed_scaling=DelayedScalingConfig(history_len=40, margin=0.5 if DEVICE == "cuda" else 3.0)),
    fp8train.Float8LinearConfig.from_recipe_name(  # more than one warp's worth of history
        "delayed", delayed_scaling=DelayedScalingConfig(history_len=2000)),
]
saved = (delayed._plain_cuda, delayed._reduction_groups, delayed.dist.all_reduce)
for cfg in configs:
    for reduce in (None, fake_all_reduce):
        base = model(cfg)
        a, b = copy.deepcopy(base), copy.deepcopy(base)
        want = run(a, False, 4, reduce)
        got = run(b, True, 4, reduce)
        for w, g in zip(want, got):
            same(w, g)
        delayed._plain_cuda, delayed._reduction_groups, delayed.dist.all_reduce = saved
        print("same", cfg.delayed_scaling, cfg.round_scales_to_power_of_2, "all-reduce" if reduce else "")
assert reduce_calls

# a model of two configurations (two groups, two launches), whose buffers then move to new storage
# (load_state_dict with assign=True): the plan must follow, the kernel write the model's new buffers
mixed = nn.Sequential(model(configs[0], 2), model(configs[2], 3))
a, b = copy.deepcopy(mixed), copy.deepcopy(mixed)
for w, g in zip(run(a, False, 3), run(b, True, 3)):
    same(w, g)
for m in (a, b):
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
for w, g in zip(run(a, False, 2), run(b, True, 2)):
    same(w, g)

# a loaded history holding a NaN: torch's amax gives a NaN scale (then inf after power-of-two
# rounding), and the kernel must too
for cfg in configs[:2]:
    base = model(cfg, 2)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    for m in (a, b):
        m[1].fp8_amax_history_weight[3] = float("nan")
    for w, g in zip(run(a, False, 2), run(b, True, 2)):
        same(w, g)
    assert b[1].fp8_scale_weight.isnan().item() or b[1].fp8_scale_weight.isinf().item()
delayed._plain_cuda = saved[0]
print("ok")

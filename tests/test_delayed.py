import copy

import pytest
import torch
import torch.nn as nn

import fp8train
from fp8train import Float8Linear, Float8LinearConfig, sync_float8_amax_and_scale_history
from fp8train.delayed import ROLES
from fp8train.scaling import fp8_max


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    return fp8train.convert_to_float8_training(m, config="delayed")


def _step(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = m(x)
    y.pow(2).mean().backward()
    sync_float8_amax_and_scale_history(m)
    return y.detach()


def test_buffers_are_in_state_dict():
    m = _model()
    keys = set(m.state_dict())
    for r in ROLES:
        for kind in ("amax", "amax_history", "scale", "nonfinite"):
            assert f"0.fp8_{kind}_{r}" in keys


def test_history_and_scale_follow_amax():
    m = _model()
    x = torch.randn(16, 32)
    _step(m, x)
    lin: Float8Linear = m[0]
    assert lin.is_amax_initialized
    amax = x.abs().max()
    assert lin.fp8_amax_history_input[0] == amax and lin.fp8_amax_history_input[1] == 0
    torch.testing.assert_close(lin.fp8_scale_input, fp8_max(torch.float8_e4m3fn) / amax)
    assert lin.fp8_amax_input == 0  # reset after sync
    _step(m, x * 0.5)
    assert lin.fp8_amax_history_input[0] == amax * 0.5
    torch.testing.assert_close(lin.fp8_scale_input, fp8_max(torch.float8_e4m3fn) / amax)  # max over history
    # grad_output history uses e5m2's max
    go_amax = lin.fp8_amax_history_grad_output.max()
    torch.testing.assert_close(lin.fp8_scale_grad_output, fp8_max(torch.float8_e5m2) / go_amax)


def test_most_recent_and_margin():
    cfg = Float8LinearConfig.from_recipe_name(
        "delayed", delayed_scaling=fp8train.DelayedScalingConfig(history_len=4, amax_compute_algo="most_recent", margin=1)
    )
    lin = fp8train.convert_to_float8_training(nn.Linear(32, 32), config=cfg)
    for s in (4.0, 1.0):
        lin(torch.full((4, 32), s)).sum().backward()
        sync_float8_amax_and_scale_history(lin)
    torch.testing.assert_close(lin.fp8_scale_input, torch.tensor(448.0 / 1.0 / 2.0))


def test_max_over_micro_batches():
    m = _model()
    small, big = torch.randn(8, 32), torch.randn(8, 32) * 10
    for x in (small, big, small):  # gradient accumulation: 3 micro-batches, one sync
        m(x).sum().backward()
    sync_float8_amax_and_scale_history(m)
    assert m[0].fp8_amax_history_input[0] == big.abs().max()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["input", "grad_output"])
def test_nonfinite_amax_skipped_and_counted(bad, where):
    m = _model()
    x = torch.randn(16, 32)
    _step(m, x)
    # the first layer sees a bad input; the last layer sees a bad grad_output (its cast saturates
    # an inf, so layers further back get finite gradients)
    lin = m[0] if where == "input" else m[2]
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    if where == "input":
        xb = x.clone()
        xb[0, 0] = bad
        y = m(xb)
        y.sum().backward()
    else:
        y = m(x)
        y.backward(torch.full_like(y, bad))
    sync_float8_amax_and_scale_history(m)
    after = lin.state_dict()
    assert after[f"fp8_nonfinite_{where}"] == 1
    assert torch.equal(after[f"fp8_amax_history_{where}"], before[f"fp8_amax_history_{where}"])
    assert torch.equal(after[f"fp8_scale_{where}"], before[f"fp8_scale_{where}"])
    assert torch.isfinite(after[f"fp8_scale_{where}"])
    # the next clean step trains normally on the last good scale
    m.zero_grad()
    y = _step(m, x)
    assert torch.isfinite(y).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_state_dict_round_trip_bit_identical():
    a = _model()
    x = torch.randn(16, 32)
    for i in range(3):
        _step(a, x * (i + 1))
    b = _model(seed=1)
    b.load_state_dict(a.state_dict())
    for lin in b.modules():
        if isinstance(lin, Float8Linear):
            lin.is_amax_initialized = True
    a.zero_grad()
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    assert torch.equal(a[0].weight.grad, b[0].weight.grad)


def test_first_step_uses_dynamic_scale():
    lin = fp8train.convert_to_float8_training(nn.Linear(32, 32), config="delayed")
    x = torch.randn(8, 32) * 1000  # far beyond the initial scale of 1.0: would saturate if used
    y = lin(x)
    want = nn.functional.linear(x, lin.weight, lin.bias)
    rel = (y - want).norm() / want.norm()
    assert rel < 0.1


def test_sync_is_fused_not_per_layer(monkeypatch):
    """The sync's kernel count must not grow with the number of layers."""
    from torch.profiler import ProfilerActivity, profile

    def ops_for(n_layers: int) -> int:
        m = nn.Sequential(*[nn.Linear(32, 32) for _ in range(n_layers)])
        fp8train.convert_to_float8_training(m, config="delayed")
        m(torch.randn(4, 32)).sum().backward()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sync_float8_amax_and_scale_history(m)
        # top-level ops only: a _foreach_ op counts once (on CPU it loops internally, on CUDA it is
        # one multi-tensor kernel); views/selects that launch nothing are not counted
        free = ("aten::select", "aten::view", "aten::unbind", "aten::as_strided", "aten::unsqueeze", "aten::slice")
        return sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::") and e.name not in free)

    assert ops_for(16) == ops_for(2)


def test_distributed_all_reduce_max(tmp_path):
    """Two gloo ranks with different activations end with identical, max-based scales."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "0.pt")
    s1 = torch.load(tmp_path / "1.pt")
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    assert s0["0.fp8_amax_history_input"][0] == 2.0  # rank 1's amax wins


def _worker(rank: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("FP8_TEST_PORT", "29533"))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        m = _model()
        x = torch.full((4, 32), float(rank + 1))
        m(x).sum().backward()
        sync_float8_amax_and_scale_history(m)
        torch.save({k: v for k, v in m.state_dict().items() if "fp8" in k}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_eval_forward_does_not_record_amax():
    m = _model()
    x = torch.randn(16, 32)
    _step(m, x)
    m.eval()
    with torch.no_grad():
        m(x * 100)
    assert m[0].fp8_amax_input == 0
    m.train()


def test_buffers_stay_fp32_under_module_dtype_casts():
    m = _model()
    _step(m, torch.randn(16, 32))
    before = {k: v.clone() for k, v in m.state_dict().items() if "fp8_" in k}
    m.to(torch.bfloat16)
    assert m[0].weight.dtype == torch.bfloat16
    for k, v in m.state_dict().items():
        if "fp8_" in k:
            assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


def _steps_compiled(model: nn.Module, n: int, eager_first: bool) -> int:
    """Train ``n`` steps of a compiled delayed-scaling model; the number of frames dynamo compiled."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(n):
        x = torch.randn(8, 32)
        if eager_first:
            with fp8train.eager_until_synced(model):
                compiled(x).square().mean().backward()
        else:
            compiled(x).square().mean().backward()
        sync_float8_amax_and_scale_history(model)
        opt.step()
        opt.zero_grad()
    return counter.frame_count


def test_eager_until_synced_compiles_a_delayed_model_once():
    from torch._dynamo.eval_frame import _stance

    def model() -> nn.Module:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
        return fp8train.convert_to_float8_training(m, config=Float8LinearConfig.from_recipe_name("delayed", emulate=True))

    m = model()
    assert fp8train.delayed_scales_pending(m)
    assert _steps_compiled(m, 3, eager_first=False) == 2  # dynamic-scale graph for step 1, then the delayed one
    m = model()
    assert _steps_compiled(m, 3, eager_first=True) == 1  # step 1 ran eagerly
    assert not fp8train.delayed_scales_pending(m) and _stance.stance == "default"
    tensorwise = fp8train.convert_to_float8_training(nn.Sequential(nn.Linear(32, 32)), config="tensorwise")
    assert not fp8train.delayed_scales_pending(tensorwise)  # nothing to wait for: the context does nothing


# --- the sync's plan and its one-launch kernel ------------------------------------------------------
def test_sync_plan_is_reused_and_follows_the_model():
    """The sync keeps what it looked up between steps, but never writes stale buffers: a model moved
    to new storage, a layer added, or a layer given another config is picked up at the next sync,
    and the plan does not keep the model alive."""
    import gc
    import weakref

    from fp8train import delayed

    m = _model()
    x = torch.randn(16, 32)
    _step(m, x)
    plan = delayed._PLANS[m]
    _step(m, x)
    assert delayed._PLANS[m] is plan  # same layers, configs and buffer addresses
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)  # new storage
    before = m[0].fp8_amax_history_input.clone()
    _step(m, 2 * x)
    assert delayed._PLANS[m] is not plan
    assert m[0].fp8_amax_history_input[0] == (2 * x).abs().max() and torch.equal(m[0].fp8_amax_history_input[1:],
                                                                                  before[:-1])
    plan = delayed._PLANS[m]
    extra = fp8train.convert_to_float8_training(nn.Sequential(nn.Linear(32, 32)), config="delayed")[0]
    m.append(extra)
    _step(m, x)
    assert delayed._PLANS[m] is not plan and extra.is_amax_initialized and extra.fp8_amax_history_input[0] > 0
    ref = weakref.ref(m)
    del m, plan, extra
    gc.collect()
    assert ref() is None


def test_sync_scale_is_divided_by_the_margin_exactly():
    """The torch path's arithmetic, pinned for a fractional margin: fp8_max / amax / 2**margin as
    two fp32 divisions (a multiply by 2**-margin rounds differently)."""
    cfg = Float8LinearConfig.from_recipe_name("delayed", delayed_scaling=fp8train.DelayedScalingConfig(margin=0.5))
    lin = fp8train.convert_to_float8_training(nn.Sequential(nn.Linear(32, 32)), config=cfg)
    amaxes = torch.logspace(-3, 3, 150)
    for a in amaxes:
        lin[0].fp8_amax_input.fill_(a)
        sync_float8_amax_and_scale_history(lin)
        lin[0].fp8_amax_history_input.zero_()
        want = torch.tensor(fp8_max(torch.float8_e4m3fn)) / a.float() / (2.0**0.5)
        assert torch.equal(lin[0].fp8_scale_input, want), (a, lin[0].fp8_scale_input, want)


def test_sync_plan_follows_a_config_change():
    """A layer given another config (here a margin) between syncs is synced with it at once."""
    import dataclasses

    from fp8train import delayed

    m = _model()
    x = torch.randn(16, 32)
    _step(m, x)
    plan = delayed._PLANS[m]
    m[0].config = dataclasses.replace(m[0].config, delayed_scaling=fp8train.DelayedScalingConfig(margin=2.0))
    _step(m, x)
    assert delayed._PLANS[m] is not plan and len(delayed._PLANS[m].groups) == 2
    assert torch.equal(m[0].fp8_scale_input, torch.tensor(fp8_max(torch.float8_e4m3fn)) / x.abs().max() / 4.0)
    assert torch.equal(m[2].fp8_scale_input, m[2].fp8_scale_input.new_tensor(fp8_max(torch.float8_e4m3fn))
                       / m[2].fp8_amax_history_input.max())


def test_sync_plan_follows_dtensor_buffers(tmp_path):
    """Buffers held as DTensors (PyTorch's TP styles replicate buffers): the plan checks their local
    tensors' storage, so replacing them is noticed (a DTensor's own data_ptr() is 0)."""
    import torch.multiprocessing as mp

    mp.spawn(_dtensor_worker, args=(str(tmp_path),), nprocs=1, join=True)
    assert (tmp_path / "ok").exists()


def _dtensor_worker(rank: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("FP8_TEST_PORT_DT", "29541"))
    dist.init_process_group("gloo", rank=rank, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))

        def replicate(m: nn.Module) -> None:
            for name, buf in list(m._buffers.items()):
                if name.startswith("fp8_"):
                    local = buf.to_local() if isinstance(buf, DTensor) else buf
                    m._buffers[name] = DTensor.from_local(local.clone(), mesh, [Replicate()])

        m = _model()
        replicate(m[0])
        for amax in (3.0, 5.0):  # the second time over new DTensors (new storage)
            m[0].fp8_amax_input.to_local().fill_(amax)
            sync_float8_amax_and_scale_history(m)
            assert m[0].fp8_amax_history_input.to_local()[0] == amax and m[0].fp8_amax_input.to_local() == 0
            assert m[0].fp8_scale_input.to_local() == fp8_max(torch.float8_e4m3fn) / 5.0 if amax == 5.0 else True
            replicate(m[0])
        open(f"{out}/ok", "w").close()
    finally:
        dist.destroy_process_group()


def test_sync_layers_in_modules_order_once():
    """The walk the sync does instead of ``model.modules()`` finds the same layers, a shared layer once."""
    from fp8train import delayed

    shared = fp8train.convert_to_float8_training(nn.Sequential(nn.Linear(16, 16)), config="delayed")[0]
    m = nn.Sequential(_model(), nn.Sequential(shared, nn.ReLU(), _model(1)), shared)
    want = [x for x in m.modules() if isinstance(x, Float8Linear)]
    assert delayed._delayed_layers(m) == want and len(want) == 5


def test_sync_kernel_under_the_triton_interpreter():
    """fp8train.sync_kernel (one launch for every layer) writes what the torch path writes, bit for
    bit, on CPU under Triton's interpreter (tests/scripts/sync_kernel_check.py)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "sync_kernel_check.py"
    root = str(Path(__file__).parents[1])  # this checkout's fp8train, whatever is installed
    env = dict(os.environ, TRITON_INTERPRET="1", FP8_DEVICE="cpu", PYTHONPATH=root)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("ok") and out.stdout.count("same") == 10


@pytest.mark.gpu
def test_sync_kernel_on_the_gpu():
    """On CUDA the sync runs as one launch and leaves every buffer as the torch path does."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fp8train import cast_kernel, delayed

    if not torch.cuda.is_available() or not cast_kernel.supports(torch.device("cuda")):
        pytest.skip("needs Triton and a GPU of compute capability 8.9+")
    m = fp8train.convert_to_float8_training(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).cuda(),
                                            config="delayed", auto_filter=False)  # (the filter keeps them bf16)
    _step(m, torch.randn(16, 32, device="cuda"))
    assert all(g.kernel for g in delayed._PLANS[m].groups)
    script = Path(__file__).parent / "scripts" / "sync_kernel_check.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                         env=dict(env, FP8_DEVICE="cuda", PYTHONPATH=str(Path(__file__).parents[1])))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("ok") and out.stdout.count("same") == 10
    # buffers of other dtypes (load_state_dict(assign=True) keeps the state dict's): the torch path,
    # with the same results as on CPU
    sd = {k: (v.to(torch.float64) if v.is_floating_point() and "fp8_" in k else v) for k, v in m.state_dict().items()}
    m.load_state_dict(sd, assign=True)
    ref = copy.deepcopy(m).cpu()
    for model in (m, ref):
        for layer in (model[0], model[2]):
            layer.fp8_amax_input.fill_(3.0)
        sync_float8_amax_and_scale_history(model)
    assert not any(g.kernel for g in delayed._PLANS[m].groups)
    for k, v in ref.state_dict().items():
        if "fp8_" in k:
            assert torch.equal(m.state_dict()[k].cpu(), v), k


@pytest.mark.gpu
def test_sync_kernel_all_reduces_across_two_gpus():
    """Two NCCL ranks: gather -> MAX all-reduce -> apply leaves what the torch path leaves, the same on
    both ranks (tests/scripts/sync_kernel_nccl.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    script = Path(__file__).parent / "scripts" / "sync_kernel_nccl.py"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok" in out.stdout

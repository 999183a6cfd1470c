"""AdamWFp8 and the blockwise fp8 storage it uses: formats, numerics against torch.optim.AdamW,
checkpoints, and errors. The FSDP2 (DTensor) runs are in test_optim_fsdp2.py."""

from __future__ import annotations

import copy
import os
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fp8train.optim as optim_mod
from fp8train.blockwise import E4M3, dequantize_blockwise, quantize_blockwise_, round_to_bf16
from fp8train.optim import AdamWFp8, state_bytes_per_param


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum())).item()


def quantize(x: torch.Tensor, block: int, stochastic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.empty(x.shape, dtype=E4M3)
    scale = torch.empty(x.shape[0], -(-x.shape[1] // block))
    quantize_blockwise_(x, data, scale, block, stochastic)
    return data, scale


# --- blockwise storage ---------------------------------------------------------------------------
def test_blockwise_round_trip_sqnr_and_edge_blocks():
    torch.manual_seed(0)
    x = torch.randn(64, 300) * torch.logspace(-6, 2, 64).unsqueeze(1)  # rows 8 decades apart; 300 = 2*128 + 44
    x[3, 128:256] = 0  # an all-zero block
    data, scale = quantize(x, 128)
    assert scale.shape == (64, 3) and scale[3, 1] == 0
    y = dequantize_blockwise(data, scale, 128)
    assert torch.isfinite(y).all() and (y[3, 128:256] == 0).all()
    # per-block scales follow each row's magnitude: e4m3 round-to-nearest gives 31.0 dB measured
    # on Gaussian data, in every row whatever its scale; bound 29 dB
    per_row = [sqnr_db(x[r], y[r]) for r in range(64) if r != 3]
    assert min(per_row) > 29, min(per_row)
    # absmax of each block maps to 448 exactly
    assert data.float().abs().amax().item() == 448


def test_stochastic_rounding_is_unbiased_round_to_nearest_is_not():
    torch.manual_seed(0)
    # 1.03 lies between e4m3 neighbours 1.0 and 1.125 (after scaling by the block max 448 -> 448)
    x = torch.full((1, 128), 1.03)
    x[0, 0] = 448.0
    rn = dequantize_blockwise(*quantize(x, 128), 128)[0, 1:]
    assert torch.all(rn == 1.0)
    mean = torch.stack([dequantize_blockwise(*quantize(x, 128, True), 128)[0, 1:] for _ in range(400)]).mean()
    # 127 x 400 draws of a Bernoulli(0.24) step of 0.125: std of the mean ~1.9e-4; bound 2e-3
    assert abs(mean.item() - 1.03) < 2e-3
    # bf16: 1 + 2**-10 lies a quarter of the way to the next bf16 value (1 + 2**-7)
    v = torch.full((100_000,), 1 + 2**-9)
    assert torch.all(round_to_bf16(v) == 1.0)
    assert abs(round_to_bf16(v, stochastic=True).float().mean().item() - (1 + 2**-9)) < 5e-5


# --- hyperparameters -----------------------------------------------------------------------------
def _params():
    return [nn.Parameter(torch.randn(4, 4))]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"lr": -1.0}, ["AdamWFp8", "lr=-1.0", ">= 0"]),
        ({"lr": float("nan")}, ["lr=nan"]),
        ({"betas": (0.9, 1.0)}, ["betas=(0.9, 1.0)", "[0, 1)"]),
        ({"betas": (0.9,)}, ["betas"]),
        ({"eps": 0.0}, ["eps=0.0", "> 0"]),
        ({"weight_decay": -0.1}, ["weight_decay=-0.1"]),
        ({"block_size": 0}, ["block_size=0", "integer >= 1"]),
        ({"block_size": 12.5}, ["block_size=12.5"]),
        ({"second_moment": "fp16"}, ["second_moment='fp16'", "bf16", "fp8"]),
        ({"stochastic_rounding": "yes"}, ["stochastic_rounding='yes'"]),
        ({"amsgrad": True}, ["amsgrad=True", "not supported"]),
        ({"maximize": True}, ["maximize=True", "not supported"]),
    ],
)
def test_bad_hyperparameters_name_the_field(kwargs, words):
    with pytest.raises(ValueError) as info:
        AdamWFp8(_params(), **kwargs)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_bad_param_group_names_the_group():
    with pytest.raises(ValueError, match=r"param_groups\[1\]: lr=-0.5"):
        AdamWFp8([{"params": _params()}, {"params": _params(), "lr": -0.5}])
    opt = AdamWFp8(_params())
    with pytest.raises(ValueError, match=r"param_groups\[1\]: second_moment='int8'"):
        opt.add_param_group({"params": _params(), "second_moment": "int8"})


def test_sparse_and_complex_gradients_are_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = AdamWFp8(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradient"):
        opt.step()
    p = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="complex parameter"):
        AdamWFp8([p]).step()


def test_fused_setting_is_checked_before_any_update(monkeypatch):
    with pytest.raises(ValueError, match=r"fused='yes' is invalid; valid: None \(auto\), True or False"):
        AdamWFp8([nn.Parameter(torch.ones(2, 2))], fused="yes")
    monkeypatch.setattr(optim_mod.optim_kernel, "available", lambda: False)
    with pytest.raises(ValueError, match="fused=True needs Triton"):
        AdamWFp8([nn.Parameter(torch.ones(2, 2))], fused=True)
    monkeypatch.undo()
    if not optim_mod.optim_kernel.available():
        return
    # a CPU parameter with fused=True fails at step(), before any parameter or state is touched
    a, b = nn.Parameter(torch.ones(4, 8)), nn.Parameter(torch.ones(4, 8))
    opt = AdamWFp8([{"params": [a]}, {"params": [b]}], fused=True)
    a.grad, b.grad = torch.ones(4, 8), torch.ones(4, 8)
    with pytest.raises(ValueError, match=r"fused=True\): param_groups\[0\] has a parameter on cpu"):
        opt.step()
    assert torch.equal(a, torch.ones(4, 8)) and not opt.state


def test_kernel_is_chosen_only_where_it_runs(monkeypatch):
    """NVIDIA, compute capability 8.9+ (Triton's e4m3 conversion): an A100 or a CPU takes the torch path."""
    K = optim_mod.optim_kernel
    monkeypatch.setattr(K, "available", lambda: True)
    cuda = torch.device("cuda", 0)
    for cap, want in (((8, 0), False), ((8, 9), True), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(K, "_capability", lambda d, cap=cap: cap)
        assert K.supports(cuda) is want, cap
    assert not K.supports(torch.device("cpu"))
    monkeypatch.setattr(K, "available", lambda: False)
    assert not K.supports(cuda)


def test_kernel_failure_falls_back_to_the_torch_path_once(monkeypatch):
    """fused=None: a kernel that fails to compile or launch warns once, and this chunk and every
    later one take the torch path (same result as fused=False); fused=True re-raises."""
    import contextlib

    K = optim_mod.optim_kernel
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no compiler")

    monkeypatch.setattr(K, "available", lambda: True)  # CI has no Triton: fused=True would fail at construction
    monkeypatch.setattr(K, "supports", lambda device: True)
    monkeypatch.setattr(K, "adamw_fp8_update_", broken)
    monkeypatch.setattr(optim_mod.torch.cuda, "device", lambda d: contextlib.nullcontext())
    torch.manual_seed(0)
    ps = {k: [nn.Parameter(torch.randn(8, 256)), nn.Parameter(torch.randn(4, 128))] for k in ("auto", "torch")}
    ps["torch"] = [nn.Parameter(p.detach().clone()) for p in ps["auto"]]
    kw = dict(lr=1e-2, stochastic_rounding=False)
    auto, ref = AdamWFp8(ps["auto"], **kw), AdamWFp8(ps["torch"], fused=False, **kw)
    for step in range(2):
        for a, b in zip(ps["auto"], ps["torch"]):
            a.grad = torch.randn(a.shape)
            b.grad = a.grad.clone()
        if step == 0:
            with pytest.warns(UserWarning, match="Triton update kernel failed .RuntimeError: no compiler"):
                auto.step()
        else:
            auto.step()
        ref.step()
    assert len(calls) == 1  # tried once, then never again
    for a, b in zip(ps["auto"], ps["torch"]):
        assert torch.equal(a, b)
    strict = AdamWFp8([nn.Parameter(torch.randn(8, 256))], fused=True, **kw)
    strict.param_groups[0]["params"][0].grad = torch.randn(8, 256)
    with pytest.raises(RuntimeError, match="no compiler"):
        strict.step()


def test_settings_changed_after_the_first_step_fail_before_any_update():
    a, b = nn.Parameter(torch.ones(4, 256)), nn.Parameter(torch.ones(4, 256))
    opt = AdamWFp8([{"params": [a]}, {"params": [b]}], lr=1e-2)
    a.grad, b.grad = torch.ones(4, 256), torch.ones(4, 256)
    opt.step()
    before = [a.detach().clone(), b.detach().clone(), opt.state[a]["step"].clone()]
    opt.param_groups[1]["block_size"] = 64
    with pytest.raises(ValueError, match=r"param_groups\[1\] \(parameter shape \(4, 256\)\): the state has "
                       r"exp_avg_scale of shape \(4, 2\).*block_size=64 \(scale shape \(4, 4\)\)"):
        opt.step()
    opt.param_groups[1]["block_size"] = 128
    opt.param_groups[1]["second_moment"] = "fp8"
    with pytest.raises(ValueError, match="second_moment='bf16'.*keep the block_size and second_moment"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1]) and torch.equal(opt.state[a]["step"], before[2])


def test_kernel_entry_checks_shapes_dtypes_and_layout():
    """adamw_fp8_update_ refuses operands that would make it read or write out of bounds (checked
    before Triton is touched, so this runs without it)."""
    from fp8train.optim_kernel import adamw_fp8_update_

    sc = dict(decay=1.0, one_minus_beta1=0.1, beta2=0.9, one_minus_beta2=0.1, step_size=1e-3, bc2_sqrt=1.0, eps=1e-8)

    def ops(rows=4, cols=256, nblk=2, v8=False):
        return (torch.zeros(rows, cols), torch.zeros(rows, cols), torch.zeros(rows, cols, dtype=E4M3),
                torch.zeros(rows, nblk), torch.zeros(rows, cols, dtype=E4M3 if v8 else torch.bfloat16),
                torch.zeros(rows, nblk) if v8 else None)

    cases = [
        (ops(nblk=1), 128, r"scales of shape \(4, ceil\(256 / block=128\)\) = \(4, 2\)"),  # block changed
        (ops(), 64, r"= \(4, 4\)"),
        (ops()[:4] + (torch.zeros(4, 256), None), 128, "bf16 v_store"),
        (ops(v8=True)[:5] + (None,), 128, "bf16 v_store"),  # fp8 v without its scales
        ((torch.zeros(256, 4).t(),) + ops()[1:], 128, "last dimension contiguous"),
        ((torch.zeros(4, 255),) + ops()[1:], 128, "shaped like p"),
        (ops(cols=2**14, nblk=1), 2**14, r"min\(block, C\) <= 8192"),
    ]
    for args, block, words in cases:
        with pytest.raises(ValueError, match=words):
            adamw_fp8_update_(*args, **sc, block=block, stochastic=False)


def test_kernel_matches_the_torch_path_under_the_triton_interpreter():
    """The kernel's arithmetic and indexing on CPU, where Triton is installed (CI has no Triton;
    the GPU tests run the compiled kernel). Measured: |dp| <= 1.5e-8; scales identical for m and
    2.3e-10 apart (~3 fp32 ulp of ~7e-4: CPU addcmul's fused multiply-add) for fp8 v."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "scripts", "optim_kernel_interpreted.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")[:-1]
    assert len(lines) == 4, proc.stdout
    for line in lines:
        shape, block, v8, dp, ds = line.split()
        assert float(dp) < 1e-6 and float(ds) < 1e-9, line


def test_fp32_moment_parameters_follow_torch_adamw_exactly():
    """1-dim parameters keep fp32 moments and take torch.optim.AdamW's (foreach) update."""
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(n)) for n in (5, 300)]
    ref = [nn.Parameter(p.detach().clone()) for p in ps]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt, ref_opt = AdamWFp8(ps, **kw), torch.optim.AdamW(ref, foreach=False, **kw)
    for _ in range(5):
        for p, r in zip(ps, ref):
            p.grad = torch.randn(p.shape)
            r.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-7)  # measured: identical
        assert opt.state[p]["exp_avg"].dtype == torch.float32


# --- numerics against torch.optim.AdamW ----------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 256), nn.GELU(),
                         nn.Linear(256, 16))


def _train(make_opt, steps: int = 200) -> tuple[nn.Module, list[float]]:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(4096, 64, generator=g)
    Y = torch.tanh(X @ (torch.randn(64, 16, generator=g) / 8)) * 2 + 0.1 * torch.randn(4096, 16, generator=g)
    torch.manual_seed(123)  # stochastic rounding's draws
    model = _mlp()
    opt = make_opt(model.parameters())
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 4096, (128,), generator=g)
        loss = F.mse_loss(model(X[idx]), Y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, losses


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# measured (200 steps, lr 3e-3, betas (0.9, 0.95), wd 0.1, stochastic rounding, torch 2.13 CPU):
# final-20-step mean loss vs AdamW +0.06% (bf16 v) / -0.29% (fp8 v); parameter drift
# ||p - p_adamw|| / ||p_adamw - p_0|| 0.091 / 0.119. With betas (0.9, 0.999): +0.22% / -0.32%,
# drift 0.081 / 0.130 (scripts/optim_numerics.py prints the full table).
@pytest.mark.parametrize("second_moment, loss_tol, drift_tol", [("bf16", 0.01, 0.15), ("fp8", 0.02, 0.2)])
def test_200_steps_track_fp32_adamw(second_moment, loss_tol, drift_tol):
    kw = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ref, ref_losses = _train(lambda p: torch.optim.AdamW(p, **kw))
    model, losses = _train(lambda p: AdamWFp8(p, second_moment=second_moment, **kw))
    p0 = _flat(_mlp())
    drift = ((_flat(model) - _flat(ref)).norm() / (_flat(ref) - p0).norm()).item()
    tail, ref_tail = sum(losses[-20:]) / 20, sum(ref_losses[-20:]) / 20
    assert abs(tail / ref_tail - 1) < loss_tol, (tail, ref_tail)
    assert drift < drift_tol, drift
    assert ref_losses[-1] < 0.3 * ref_losses[0]  # the problem is actually learned


def test_stochastic_rounding_keeps_bf16_second_moment_decaying():
    """beta2 = 0.999 with round-to-nearest bf16: each step's decay (0.1%) is below half a bf16 ulp
    (0.1-0.2%), so v stops decreasing. Gradients shrink 100x over the run; v must follow."""
    torch.manual_seed(0)
    ps = {sr: nn.Parameter(torch.zeros(8, 256)) for sr in (False, True)}
    opts = {sr: AdamWFp8([p], lr=0.0, betas=(0.9, 0.999), stochastic_rounding=sr) for sr, p in ps.items()}
    v_ref = torch.zeros(8, 256)  # torch.optim.AdamW's exp_avg_sq recurrence, in fp32
    steps = 1000
    for t in range(steps):
        g = torch.randn(8, 256) * 10 ** (-2 * t / steps)
        v_ref.mul_(0.999).addcmul_(g, g, value=0.001)
        for sr, p in ps.items():
            p.grad = g
            opts[sr].step()
    ratio = {sr: (opts[sr].state[p]["exp_avg_sq"].float() / v_ref).sqrt().mean().item() for sr, p in ps.items()}
    # measured: round-to-nearest 1.6x too large (v stuck well above the truth: steps 1.6x too small),
    # stochastic 1.000
    assert ratio[False] > 1.3, ratio
    assert abs(ratio[True] - 1) < 0.03, ratio


def test_odd_shapes_dtypes_and_layouts_follow_adamw():
    torch.manual_seed(0)
    shapes = [(5, 3, 50), (7, 130), (1, 1)]  # 3-D, a partial last block, a single element
    ref_ps = [nn.Parameter(torch.randn(s)) for s in shapes] + [nn.Parameter(torch.randn(16, 8).t())]  # non-contiguous
    ps = [nn.Parameter(p.detach().clone()) for p in ref_ps[:3]] + [nn.Parameter(ref_ps[3].detach().t().clone().t())]
    assert not ps[3].is_contiguous()
    bf = nn.Parameter(torch.randn(8, 128).bfloat16())  # bf16 parameter: updated in fp32, stored in bf16
    ref_bf = nn.Parameter(bf.detach().float())
    ref = torch.optim.AdamW(ref_ps + [ref_bf], lr=1e-2)
    opt = AdamWFp8(ps + [bf], lr=1e-2, stochastic_rounding=False)
    for _ in range(20):
        for p, rp in zip(ps + [bf], ref_ps + [ref_bf]):
            g = torch.randn(rp.shape)
            p.grad, rp.grad = g.to(p.dtype), g
        opt.step()
        ref.step()
    for p, rp in zip(ps + [bf], ref_ps + [ref_bf]):
        moved = (rp.detach() - p.detach().float()).norm() / (rp.detach().norm())
        # measured after 20 steps of lr 1e-2, relative to the weight's norm: <= 0.3% (fp32
        # weights), 1.15% (the bf16 weight: its own rounding); bounds 1% / 2%
        assert moved < (0.02 if p.dtype == torch.bfloat16 else 0.01), (tuple(p.shape), moved)
    assert not ps[3].is_contiguous() and opt.state[ps[3]]["exp_avg"].dtype == E4M3
    assert opt.state[ps[0]]["exp_avg_scale"].shape == (5, 3, 1)
    assert opt.state[ps[1]]["exp_avg_scale"].shape == (7, 2)


def test_row_chunking_is_exact(monkeypatch):
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(40, 96)), nn.Parameter(torch.zeros(40, 96))
    b.data.copy_(a.data)
    opt_a = AdamWFp8([a], lr=1e-2, stochastic_rounding=False)
    opt_b = AdamWFp8([b], lr=1e-2, stochastic_rounding=False)
    for _ in range(3):
        g = torch.randn(40, 96)
        a.grad, b.grad = g, g.clone()
        opt_a.step()
        monkeypatch.setattr(optim_mod, "_CHUNK_ELEMENTS", 96 * 7)  # 6 chunks of 7 rows, the last one 5
        opt_b.step()
        monkeypatch.undo()
    assert torch.equal(a, b)
    for k in ("exp_avg", "exp_avg_scale", "exp_avg_sq"):
        assert torch.equal(opt_a.state[a][k].reshape(-1).view(torch.uint8), opt_b.state[b][k].reshape(-1).view(torch.uint8))


# --- memory --------------------------------------------------------------------------------------
def test_bytes_per_param():
    assert state_bytes_per_param("bf16", 128) == pytest.approx(3.03125)
    assert state_bytes_per_param("fp8", 128) == pytest.approx(2.0625)
    for sm, want in (("bf16", 3.03125), ("fp8", 2.0625)):
        lin = nn.Linear(256, 256, bias=False)
        opt = AdamWFp8(lin.parameters(), second_moment=sm)
        lin(torch.randn(2, 256)).sum().backward()
        opt.step()
        assert opt.state_bytes()["bytes_per_param"] == pytest.approx(want)
    ref = torch.optim.AdamW(lin.parameters())
    ref.step()
    assert sum(t.numel() * t.element_size() for k, t in ref.state[lin.weight].items() if k != "step") / 256**2 == 8


# --- checkpoints ---------------------------------------------------------------------------------
def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    model(torch.randn(8, 64)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("second_moment", ["bf16", "fp8"])
def test_state_dict_round_trip_gives_bit_identical_next_step(second_moment):
    model = _mlp()
    opt = AdamWFp8(model.parameters(), lr=1e-2, weight_decay=0.1, second_moment=second_moment)
    for s in range(5):
        _step(model, opt, s)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    _step(model, opt, 99)  # stochastic rounding reseeded the same way in both runs

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = _mlp()
    fresh_opt = AdamWFp8(fresh.parameters(), lr=1e-2, weight_decay=0.1, second_moment=second_moment)
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["optim"])
    w = fresh.get_submodule("3").weight
    assert fresh_opt.state[w]["exp_avg"].dtype == E4M3  # not cast to the parameter's fp32
    assert fresh_opt.state[w]["exp_avg_sq"].dtype == (torch.bfloat16 if second_moment == "bf16" else E4M3)
    _step(fresh, fresh_opt, 99)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), fresh_opt.state.values()):
        for k in a:
            assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def test_state_dict_round_trip_keeps_state_dtypes_for_bf16_params():
    model = _mlp().to(torch.bfloat16)
    opt = AdamWFp8(model.parameters(), lr=1e-2)
    for s in range(3):
        torch.manual_seed(s)
        model(torch.randn(8, 64, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    saved = copy.deepcopy(opt.state_dict())
    fresh_opt = AdamWFp8(model.parameters(), lr=1e-2)
    fresh_opt.load_state_dict(saved)
    # Optimizer.load_state_dict would cast the fp32 block scales to the parameters' bf16
    for p in model.parameters():
        for k, v in opt.state[p].items():
            assert fresh_opt.state[p][k].dtype == v.dtype, k
            assert torch.equal(fresh_opt.state[p][k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


def test_loads_torch_adamw_state_and_quantizes_it():
    model = _mlp()
    ref = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for s in range(5):
        _step(model, ref, s)
    fresh = _mlp()
    fresh.load_state_dict(model.state_dict())
    opt = AdamWFp8(fresh.parameters(), lr=1e-2, stochastic_rounding=False)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # as from a file: no tensor shared with `ref`
    w = fresh.get_submodule("3").weight
    assert opt.state[w]["exp_avg"].dtype == E4M3 and opt.state[w]["exp_avg_sq"].dtype == torch.bfloat16
    assert opt.state[fresh.get_submodule("3").bias]["exp_avg"].dtype == torch.float32
    _step(model, ref, 5)
    _step(fresh, opt, 5)
    for a, b in zip(model.parameters(), fresh.parameters()):
        # one step from quantized moments: measured <= 4.4e-4 absolute (steps of ~1e-2; fp32-state biases: 0); bound 1e-3
        assert (a - b).abs().max() < 1e-3


def test_loaded_settings_win_and_inconsistent_states_fail():
    model = _mlp()
    opt = AdamWFp8(model.parameters(), block_size=128)
    _step(model, opt, 0)
    # as for any torch optimizer, the saved hyperparameters (block_size included) replace the new ones
    other = AdamWFp8(model.parameters(), block_size=64, second_moment="fp8")
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["block_size"] == 128 and other.param_groups[0]["second_moment"] == "bf16"
    _step(model, other, 1)
    # a state dict whose groups disagree with its states is refused, naming the setting
    sd = opt.state_dict()
    sd["param_groups"][0]["block_size"] = 64
    with pytest.raises(ValueError, match=r"block_size=64.*build it with the saved settings"):
        AdamWFp8(model.parameters()).load_state_dict(sd)
    sd["param_groups"][0]["block_size"] = -1
    with pytest.raises(ValueError, match=r"param_groups\[0\]: block_size=-1"):
        AdamWFp8(model.parameters()).load_state_dict(sd)


# --- torch.compile -------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_update_matches_eager_without_recompiling_per_lr():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    shapes = [(64, 256), (32, 300)]  # whole blocks, and a partial last block
    eager_ps = [nn.Parameter(torch.randn(s)) for s in shapes]
    comp_ps = [nn.Parameter(p.detach().clone()) for p in eager_ps]
    kw = dict(lr=1e-2, weight_decay=0.1, stochastic_rounding=False)
    eager, comp = AdamWFp8(eager_ps, **kw), AdamWFp8(comp_ps, compile=True, **kw)
    steps = 6
    for t in range(steps):
        for o in (eager, comp):
            o.param_groups[0]["lr"] = 1e-2 * (t + 1)  # a schedule: a new lr every step
        for a, b in zip(eager_ps, comp_ps):
            a.grad = torch.randn(a.shape)
            b.grad = a.grad.clone()
        eager.step()
        comp.step()
    for a, b in zip(eager_ps, comp_ps):
        # measured: <= 2.4e-7 absolute after 6 steps (fused vs unfused fp32 arithmetic); bound 1e-5
        assert (a - b).abs().max() < 1e-5
        # the fp8 first moments agree to one e4m3 step at most (measured: identical)
        ma = dequantize_blockwise(eager.state[a]["exp_avg"], eager.state[a]["exp_avg_scale"], 128)
        mb = dequantize_blockwise(comp.state[b]["exp_avg"], comp.state[b]["exp_avg_scale"], 128)
        assert ((ma - mb).abs() <= ma.abs() / 8 + 1e-12).all()
    # the first shape, then the second with shapes dynamic; none per learning rate (hyperparameters
    # are tensor inputs). Measured 2 on torch 2.13 CPU (4 when they were Python floats).
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])

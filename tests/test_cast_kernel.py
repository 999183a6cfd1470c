"""The Triton cast kernel (fp8train.cast_kernel): same fp8 bits as the torch cast, both layouts, amax.

GPU tests (marked gpu) check it bit for bit against ``saturated_cast`` and a Float8Linear with
``cast_kernel="auto"`` against ``"torch"``; CPU tests check the configuration and, where Triton is
installed, run the kernel under Triton's interpreter.
"""

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fp8train
from fp8train import CastConfig, Float8LinearConfig, cast_kernel
from fp8train.scaling import saturated_cast
from _helpers import sqnr

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2


def test_cast_kernel_setting_is_checked():
    with pytest.raises(ValueError, match=r"cast_kernel='cuda'.*'auto', 'triton', 'torch'"):
        Float8LinearConfig(cast_kernel="cuda")
    cfg = Float8LinearConfig.from_recipe_name("delayed", cast_kernel="torch")
    assert cfg.name == "delayed"  # the recipe is the same whoever runs its casts


def test_triton_cast_kernel_on_cpu_fails_naming_the_setting():
    lin = fp8train.convert_to_float8_training(
        nn.Linear(32, 32), config=Float8LinearConfig(emulate=True, cast_kernel="triton"), auto_filter=False)
    w = lin.weight.detach().clone()
    with pytest.raises(ValueError, match=r"cast_kernel='triton' needs Triton.*runs on cpu.*'auto'"):
        lin(torch.randn(4, 32))
    assert torch.equal(lin.weight, w)
    # a recipe without tensorwise casts never uses the kernel: nothing to refuse
    rowwise = Float8LinearConfig.from_recipe_name("rowwise", emulate=True, cast_kernel="triton")
    fp8train.convert_to_float8_training(nn.Linear(32, 32), config=rowwise, auto_filter=False)(torch.randn(4, 32))


def test_kernel_takes_only_what_its_offsets_and_grid_allow():
    meta = dict(device="meta", dtype=torch.bfloat16)
    assert cast_kernel._fits_shape(torch.empty(16384, 8192, **meta), E4)
    assert cast_kernel._fits_shape(torch.empty(4, 4, device="meta", dtype=torch.float32), E5)
    assert not cast_kernel._fits_shape(torch.empty(4, 4, **meta), torch.bfloat16)  # not an fp8 target
    assert not cast_kernel._fits_shape(torch.empty(2, 3, 4, **meta), E4)
    # a strided view spanning > 2**31 elements (int32 offsets), though it holds only 64 x 65536
    assert not cast_kernel._fits_shape(torch.empty_strided((64, 65536), (1, 40000), **meta), E4)
    assert not cast_kernel._fits_shape(torch.empty(1, 65535 * 128 + 1, **meta), E4)  # grid's second dim
    assert cast_kernel._fits_shape(torch.empty(1, 65535 * 128, **meta), E4)


def test_kernel_is_not_used_on_cpu():
    x = torch.randn(64, 64)
    assert not cast_kernel.fits(x, E4)
    with pytest.raises(ValueError, match="cast_transpose: x .*needs a 2-D"):
        cast_kernel.cast_transpose(x, torch.tensor(1.0), E4)


def test_gemm_takes_the_layout_the_cast_wrote():
    """An operand holding both layouts (as the kernel writes them) feeds _scaled_mm without a copy, and
    the GEMM's result is the same as from one layout."""
    from fp8train.config import ScaledMMConfig
    from fp8train.ops import Fp8Operand, scaled_mm_operands

    torch.manual_seed(0)
    s = torch.tensor(4.0)
    a, b = saturated_cast(torch.randn(32, 64), s, E4), saturated_cast(torch.randn(48, 64), s, E4)
    a_col = a.t().contiguous().t()  # the same values, column-major
    both = Fp8Operand(a, s, a_col)
    assert both.layout(row_major=True) is a and both.layout(row_major=False) is a_col
    assert both.t().layout(row_major=True).data_ptr() == a_col.data_ptr()  # a.T row-major is a_col's storage
    lone = Fp8Operand(a, s)
    assert lone.layout(row_major=False).data_ptr() != a.data_ptr()  # one layout: a copy
    y_both = scaled_mm_operands(both, Fp8Operand(b, s).t(), ScaledMMConfig(), torch.float32)
    y_lone = scaled_mm_operands(lone, Fp8Operand(b, s).t(), ScaledMMConfig(), torch.float32)
    assert torch.equal(y_both, y_lone)


def _torch_op(x, scale, fp8_dtype, row_major, transposed, amax):
    """The kernel's op contract in torch ops (its values are saturated_cast's, tested on GPU)."""
    y = saturated_cast(x, scale, fp8_dtype)
    a = x.float().abs().amax().reshape(1)
    empty = torch.empty(0, dtype=fp8_dtype)
    return (y if row_major else empty, y.t().contiguous() if transposed else empty,
            torch.where(torch.isnan(a), float("inf"), a) if amax else torch.empty(0))


_CUSTOM = Float8LinearConfig(cast_config_input_for_grad_weight={"target_dtype": "e5m2"})  # x re-cast in backward


@pytest.mark.parametrize("config", ["tensorwise", "delayed", "rowwise", _CUSTOM],
                         ids=lambda c: c if isinstance(c, str) else "custom")
@pytest.mark.parametrize("scenario", ["plain", "frozen_input", "frozen_weight", "weight_cache", "checkpoint"])
def test_kernel_path_plumbing_on_cpu(config, scenario, monkeypatch):
    """The linear's use of the kernel (layouts asked for, the layout saved for backward, amax
    recording, re-casts in backward) against the torch casts, bit for bit, on CPU: the kernel's op
    is replaced by its contract in torch ops and `fits` made to accept CPU tensors."""
    from torch.utils.checkpoint import checkpoint

    calls = []

    def op(*args):
        calls.append(args[3:])
        return _torch_op(*args)

    monkeypatch.setattr(cast_kernel, "_cast_transpose_op", op, raising=False)
    monkeypatch.setattr(cast_kernel, "_cast_transpose_eager", op, raising=False)
    monkeypatch.setattr(cast_kernel, "fits", lambda x, dtype: x.dim() == 2)
    seen = []
    real = fp8train.linear.scaled_mm_operands

    def watch(a, b, cfg, out_dtype):
        da, db = a.layout(row_major=True), b.layout(row_major=False)
        seen.append([da.view(torch.uint8).clone(), da.stride(), db.view(torch.uint8).clone(), db.stride(),
                     a.scale.clone(), b.scale.clone()])
        return real(a, b, cfg, out_dtype)

    monkeypatch.setattr(fp8train.linear, "scaled_mm_operands", watch)
    base_cfg = config if isinstance(config, Float8LinearConfig) else Float8LinearConfig.from_recipe_name(config)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 48, bias=False))
    runs = {}
    for kernel in ("auto", "torch"):
        calls.clear()
        seen.clear()
        m = fp8train.convert_to_float8_training(copy.deepcopy(base), auto_filter=False,
                                                config=dataclasses.replace(base_cfg, cast_kernel=kernel))
        if scenario == "frozen_weight":
            m[0].weight.requires_grad_(False)
        outs = []
        for step in range(3):
            if scenario == "weight_cache":
                fp8train.set_weight_cast_cache(m, "fill" if step == 0 else "reuse")
            x = torch.randn(40, 64, generator=torch.Generator().manual_seed(step)) * (step + 1)
            x.requires_grad_(scenario != "frozen_input")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = checkpoint(m, x, use_reentrant=False) if scenario == "checkpoint" else m(x)
            y.float().square().mean().backward()
            outs += [y.detach()] + [t.grad for t in (x, *m.parameters()) if t.grad is not None]
            if base_cfg.has_delayed:
                outs += [b.clone() for n, b in m.named_buffers() if n.split(".")[-1].startswith("fp8_amax_")]
                fp8train.sync_float8_amax_and_scale_history(m)
                outs += [b.clone() for n, b in m.named_buffers() if "scale" in n or "history" in n]
            m.zero_grad(set_to_none=True)
        runs[kernel] = (outs, [list(c) for c in seen], list(calls))
    (outs_k, seen_k, calls_k), (outs_t, seen_t, calls_t) = runs["auto"], runs["torch"]
    assert not calls_t and (len(calls_k) > 0) == base_cfg.has_tensorwise
    if base_cfg.has_tensorwise and scenario == "plain":
        # forward: input rows + the column-major copy backward reuses (custom: x is re-cast, rows only);
        # delayed: amax from the kernel once stored scales are used (after the first sync)
        assert calls_k[0] == ((True, True, False) if config != _CUSTOM else (True, False, False))
        assert any(c[2] for c in calls_k) == base_cfg.has_delayed
    assert len(seen_k) == len(seen_t) and len(outs_k) == len(outs_t)
    for a, b in zip(seen_k, seen_t):
        assert all(torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v for u, v in zip(a, b))
    for a, b in zip(outs_k, outs_t):
        assert torch.equal(a, b)


def test_kernel_under_the_triton_interpreter():
    pytest.importorskip("triton")
    script = Path(__file__).parent / "scripts" / "cast_kernel_interpreted.py"
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok" in out.stdout


# --- GPU -------------------------------------------------------------------------------------------
def _needs_kernel():
    if not torch.cuda.is_available() or not cast_kernel.supports(torch.device("cuda")):
        pytest.skip("needs Triton and a GPU of compute capability 8.9+")


def _bits(t):
    return t.view(torch.uint8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [E4, E5])
@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1000, 300), (4096, 1024), (64, 128), (1, 17), (1, 128), (2048, 4096)])
def test_kernel_equals_the_torch_cast_bit_for_bit(dtype, src, shape):
    _needs_kernel()
    torch.manual_seed(0)
    x = (torch.randn(shape, device="cuda") * torch.logspace(-3, 3, shape[1], device="cuda")).to(src)
    big = 6e4 if src == torch.float16 else 1e30  # one value that saturates (finite in fp16)
    x.view(-1)[:3] = torch.tensor([0.0, -0.0, big], device="cuda").to(src)
    scale = fp8train.scaling.amax_to_scale(x.abs().amax() / 4, dtype)
    y, yt, amax = cast_kernel.cast_transpose(x, scale, dtype, amax=True)
    ref = saturated_cast(x, scale, dtype)
    assert y.dtype == dtype and y.is_contiguous() and yt.is_contiguous() and yt.shape == shape[::-1]
    assert torch.equal(_bits(y), _bits(ref))
    assert torch.equal(_bits(yt), _bits(ref.t().contiguous()))
    assert amax.shape == () and amax.item() == x.float().abs().max().item()
    # a strided input (a transposed view) and one layout at a time
    yt_only = cast_kernel.cast_transpose(x.t(), scale, dtype, row_major=False, transposed=True)
    assert yt_only[0] is None and yt_only[2] is None and torch.equal(_bits(yt_only[1]), _bits(ref))
    y2, yt2, _ = cast_kernel.cast_transpose(x.t(), scale, dtype)  # strided input, both layouts
    assert torch.equal(_bits(y2), _bits(ref.t().contiguous())) and torch.equal(_bits(yt2), _bits(ref))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [E4, E5])
@pytest.mark.parametrize("shape", [(1024, 2048), (1000, 300), (1, 17)])
@pytest.mark.parametrize("src", [torch.bfloat16, torch.float32])  # FSDP2 shards are fp32 master weights
def test_cast_with_stored_scale_in_one_launch(dtype, shape, src):
    """FSDP2's delayed shard cast: bytes of saturated_cast, the scale copied (a later in-place
    rewrite of the buffer does not reach it), the amax folded into the running max in place."""
    _needs_kernel()
    torch.manual_seed(0)
    x = (torch.randn(shape, device="cuda") * 3).to(src)
    scale = torch.tensor(20.0, device="cuda")
    for start in (0.0, 1e3):  # below the shard's amax: raised to it; above: kept
        amax = torch.tensor(start, device="cuda")
        y, scale_copy = cast_kernel.cast_with_stored_scale(x, scale, dtype, amax)
        assert torch.equal(_bits(y), _bits(saturated_cast(x, scale, dtype))) and y.is_contiguous()
        assert amax.item() == max(start, x.float().abs().max().item())
        scale.fill_(7.0)
        assert scale_copy.item() == 20.0
        scale.fill_(20.0)
    y, _ = cast_kernel.cast_with_stored_scale(x.t(), scale, dtype)  # strided, no amax
    assert torch.equal(_bits(y), _bits(saturated_cast(x.t(), scale, dtype)))
    x[0, 0] = float("nan")
    amax = torch.zeros((), device="cuda")
    cast_kernel.cast_with_stored_scale(x, scale, dtype, amax)
    assert amax.item() == float("inf")
    with pytest.raises(ValueError, match="amax must be a one-element fp32"):
        cast_kernel.cast_with_stored_scale(x, scale, dtype, torch.zeros(2, device="cuda"))
    y, scale_copy = cast_kernel.cast_with_stored_scale(x[:0], scale, dtype, amax)  # empty: nothing launched
    assert y.shape == (0, shape[1]) and scale_copy.item() == 20.0 and amax.item() == float("inf")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [E4, E5])
@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16])
def test_cast_group_equals_the_torch_cast_of_each_tensor(dtype, src, monkeypatch):
    """One launch for a list of tensors (FSDP2's shards after an optimizer step), each with its own
    scale: every byte as saturated_cast, empty and odd-sized tensors included, NaN/inf kept, and
    lists longer than one launch takes."""
    _needs_kernel()
    torch.manual_seed(0)
    shapes = [(1024, 2048), (0, 64), (3, 4097), (1, 1), (4096,), (1000, 300)]
    xs = [(torch.randn(s, device="cuda") * 4).to(src) for s in shapes]
    xs[0][0, :3] = torch.tensor([1e6, float("nan"), -float("inf")])
    scales = torch.tensor([30.0, 2.0, 0.5, 1e-3, 448.0, 7.0], device="cuda")
    for limit in (1024, 4):  # 4: two launches
        monkeypatch.setattr(cast_kernel, "_GROUP_MAX", limit)
        out = cast_kernel.cast_group(xs, scales, dtype)
        assert [y.shape for y in out] == [x.shape for x in xs] and all(y.dtype == dtype for y in out)
        for x, scale, y in zip(xs, scales, out):
            assert torch.equal(_bits(y), _bits(saturated_cast(x, scale, dtype)))
    assert cast_kernel.cast_group([], scales[:0], dtype) == []
    with pytest.raises(ValueError, match=r"xs\[1\] is \(64, 1024\)"):
        cast_kernel.cast_group([xs[0], xs[0][:, :64].t()], scales[:2], dtype)  # not contiguous
    with pytest.raises(ValueError, match="scales must be a \\[2\\] fp32"):
        cast_kernel.cast_group(xs[:2], scales[:3], dtype)


@pytest.mark.gpu
def test_precast_shards_equal_a_fresh_cast_on_gpu():
    """The fused precompute's one-launch cast of every shard against each layer casting its own."""
    _needs_kernel()
    from fp8train import fsdp

    torch.manual_seed(0)
    cfg = Float8LinearConfig.from_recipe_name("tensorwise", enable_fsdp_float8_all_gather=True)
    layers = [fp8train.Float8Linear(k, n, bias=False, config=cfg).cuda() for k, n in ((64, 48), (300, 7), (128, 256))]
    wrappers = [m.weight for m in layers]
    scales = torch.tensor([3.0, 40.0, 0.25], device="cuda")
    for w, m, s in zip(wrappers, layers, scales):
        w._precomputed_scale, w._precomputed_at = s, fsdp._stamp(w, m)
    fresh = [w.fsdp_pre_all_gather(_OneRankMesh(), w.shape, w.stride(), m, None) for w, m in zip(wrappers, layers)]
    fsdp._precast(layers, wrappers, scales)
    for w, m, (data, meta) in zip(wrappers, layers, fresh):
        got = w.fsdp_pre_all_gather(_OneRankMesh(), w.shape, w.stride(), m, None)
        assert got is not None and torch.equal(got[0][0], data[0]) and torch.equal(got[1][0], meta[0])
        assert got[0][0].data_ptr() == w._precast[1][0][0].data_ptr()  # the precast bytes, not a new cast


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
@pytest.mark.parametrize("training", [True, False])
def test_fsdp_shard_cast_with_the_kernel_equals_torch(recipe, training):
    """The pre-all-gather with the real kernel against cast_kernel="torch": bytes, scale, amax."""
    _needs_kernel()
    got = _gather_shard(recipe, "auto", training, "cuda")
    ref = _gather_shard(recipe, "torch", training, "cuda")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]) and got[1].item() == 32.0
    if recipe == "delayed":
        assert torch.equal(got[2], ref[2]) and (got[2].item() > 0) == training


@pytest.mark.gpu
def test_kernel_marks_nan_as_an_infinite_amax():
    _needs_kernel()
    x = torch.ones(256, 256, device="cuda", dtype=torch.bfloat16)
    x[100, 7] = float("nan")
    y, _, amax = cast_kernel.cast_transpose(x, torch.tensor(2.0, device="cuda"), E4, transposed=False, amax=True)
    assert amax.item() == float("inf")
    assert torch.isnan(y[100, 7].float()) and (y.float().nan_to_num(0) == 2.0).sum() == x.numel() - 1


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
@pytest.mark.parametrize("compiled", [False, True])
def test_linear_with_the_kernel_equals_torch_casts(recipe, compiled, monkeypatch):
    """Every GEMM gets the same fp8 operands (bytes, layout, scale) with and without the kernel; results
    and delayed-scaling state agree. (cuBLAS may round a GEMM's result differently from one call to
    the next even for identical operands: measured 8.7e-11 on a weight gradient, H200. So results are
    compared by SQNR; the operands bit for bit, in eager mode where the GEMM calls can be watched.)"""
    _needs_kernel()
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(512, 1024, bias=False), nn.GELU(), nn.Linear(1024, 256)).cuda()
    seen = []
    if not compiled:
        real = fp8train.linear.scaled_mm_operands

        def watch(a, b, cfg, out_dtype):
            da, db = a.layout(row_major=True), b.layout(row_major=False)
            seen.append((da.view(torch.uint8).clone(), da.stride(), db.view(torch.uint8).clone(), db.stride(),
                         a.scale.clone(), b.scale.clone()))
            return real(a, b, cfg, out_dtype)

        monkeypatch.setattr(fp8train.linear, "scaled_mm_operands", watch)
    results, operands = {}, {}
    for kernel in ("auto", "torch"):
        # under torch.compile "auto" means inductor's casts: ask for the kernel by name there
        cfg = Float8LinearConfig.from_recipe_name(recipe, cast_kernel="triton" if compiled and kernel == "auto" else kernel)
        m = fp8train.convert_to_float8_training(copy.deepcopy(base), config=cfg, auto_filter=False)
        run = torch.compile(m, fullgraph=True) if compiled else m
        outs = []
        seen.clear()
        for step in range(3):  # delayed: dynamic scales first, stored ones after the first sync
            x = torch.randn(2, 300, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = run(x.requires_grad_())
            y.float().square().mean().backward()
            outs += [y.detach(), x.grad] + [p.grad.clone() for p in m.parameters()]
            if m[0].config.has_delayed:
                outs += [b.clone() for n, b in m.named_buffers() if n.endswith(("amax_input", "amax_grad_output"))]
                fp8train.sync_float8_amax_and_scale_history(m)
                outs += [b.clone() for n, b in m.named_buffers() if "scale" in n or "history" in n]
            m.zero_grad()
        results[kernel], operands[kernel] = outs, list(seen)
    assert len(operands["auto"]) == len(operands["torch"]) == (0 if compiled else 3 * 6)
    for a, b in zip(operands["auto"], operands["torch"], strict=True):
        assert all(torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v for u, v in zip(a, b))
    # compiled, inductor's casts read a fused producer's fp32 values (the GELU) where the kernel reads
    # them rounded to bf16, as eager does, so some elements round to neighbouring fp8 values: measured
    # (H200) 30.9 dB between the two outputs (tensorwise), 23.3 dB between the input gradients (delayed)
    threshold = 20 if compiled else 60
    for a, b in zip(results["auto"], results["torch"], strict=True):
        assert a.shape == b.shape and (torch.equal(a, b) or sqnr(a.float(), b.float()) > threshold)


@pytest.mark.gpu
@pytest.mark.parametrize("setting", ["auto", "triton"])
def test_kernel_in_the_compiled_graph_only_when_asked(setting):
    """Under torch.compile "triton" launches the kernel from the compiled code (no graph break) and
    "auto" leaves the casts to inductor."""
    _needs_kernel()
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    cfg = Float8LinearConfig(cast_kernel=setting)
    lin = fp8train.convert_to_float8_training(nn.Linear(1024, 1024, bias=False).cuda(), config=cfg, auto_filter=False)
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    c = torch.compile(lin, fullgraph=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            c(x).sum().backward()

    _, code = run_and_get_code(step)
    assert ("_cast_transpose_kernel" in "\n".join(code)) == (setting == "triton")
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_eager_code_launches_directly_and_traced_code_uses_the_op(monkeypatch):
    """The op (which torch.compile / make_fx can trace) wherever something traces; the direct launch
    (no custom-op dispatch: host time) only in plain eager code on plain tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    used = []

    def recorder(name):
        def run(*args):
            used.append(name)
            return _torch_op(*args)
        return run

    monkeypatch.setattr(cast_kernel, "_cast_transpose_op", recorder("op"), raising=False)
    monkeypatch.setattr(cast_kernel, "_cast_transpose_eager", recorder("direct"), raising=False)
    monkeypatch.setattr(cast_kernel, "fits", lambda x, dtype: x.dim() == 2)
    x, scale = torch.randn(8, 16), torch.tensor(4.0)

    def cast(t):
        return cast_kernel.cast_transpose(t, scale, E4)[0]

    ref = cast(x)
    assert used == ["direct"]
    assert torch.equal(make_fx(cast)(x)(x), ref) and used[1:] == ["op"]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        cast(mode.from_tensor(x))
    assert used[2:] == ["op"]
    torch._dynamo.reset()
    assert torch.equal(torch.compile(cast, backend="eager", fullgraph=True)(x), ref)
    assert used[3] == "op"
    # plain tensors and parameters launch directly; subclasses, functionalized, vmapped, jit-traced do not
    class Sub(torch.Tensor):
        pass

    assert cast_kernel.launches_directly(x, torch.nn.Parameter(x)) and not cast_kernel.launches_directly(
        x, x.as_subclass(Sub))
    seen = []

    def probe(t):
        seen.append(cast_kernel.launches_directly(t))
        return t * 2

    torch.func.functionalize(probe)(x)
    torch.vmap(probe)(x)
    torch.jit.trace(probe, (x,), check_trace=False)
    assert seen == [False, False, False]


class _OneRankMesh:
    """FSDP2's shard mesh for one rank: the stored or precomputed scale needs no collective."""

    def size(self) -> int:
        return 1

    def get_group(self):
        raise AssertionError("a collective was attempted")


def _gather_shard(recipe: str, kernel: str, training: bool, device: str = "cpu"):
    """One fp8 pre-all-gather of a fresh layer's weight: ``(bytes, metadata scale, amax buffer)``.
    Delayed: stored scale 32 (the buffer then overwritten, as the sync would); tensorwise:
    precomputed scale 32."""
    from fp8train.fsdp import _stamp

    torch.manual_seed(0)
    cfg = Float8LinearConfig.from_recipe_name(recipe, enable_fsdp_float8_all_gather=True, cast_kernel=kernel)
    lin = fp8train.Float8Linear(48, 40, bias=False, config=cfg).to(device).train(training)
    w = lin.weight
    if recipe == "delayed":
        lin.is_amax_initialized = True
        lin.fp8_scale_weight.fill_(32.0)
    else:
        w._precomputed_scale = torch.tensor(32.0, device=device)
        w._precomputed_at = _stamp(w, lin)
    (data,), (scale, dtype, _) = w.fsdp_pre_all_gather(_OneRankMesh(), w.shape, w.stride(), lin, None)
    if recipe == "delayed":  # the metadata's scale is a copy: the sync rewrites the buffer in place
        assert scale is not lin.fp8_scale_weight and scale.data_ptr() != lin.fp8_scale_weight.data_ptr()
        lin.fp8_scale_weight.fill_(1.0)
    return data, scale, getattr(lin, "fp8_amax_weight", None)


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
@pytest.mark.parametrize("mode", ["train", "eval", "traced"])
def test_fsdp_shard_cast_plumbing_on_cpu(recipe, mode, monkeypatch):
    """FSDP2's pre-all-gather casts the weight shard through the kernel where it fits (row-major only;
    delayed: one launch that also records the amax in training and copies the stored scale; where
    the kernel cannot be launched directly, the op plus torch ops): same bytes, scale and recorded
    amax as the torch path, with the kernel replaced by its torch contract on CPU."""
    calls = []

    def op(*args):
        calls.append(args[3:])
        return _torch_op(*args)

    def stored(x, scale, dtype, amax=None):  # cast_with_stored_scale's contract in torch ops
        calls.append(("stored", amax is not None))
        if amax is not None:
            a = x.float().abs().amax()
            amax.copy_(torch.maximum(amax, torch.where(torch.isnan(a), float("inf"), a)))
        return saturated_cast(x, scale, dtype), scale.clone()

    training = mode != "eval"
    ref = _gather_shard(recipe, "torch", training)
    monkeypatch.setattr(cast_kernel, "_cast_transpose_op", op, raising=False)
    monkeypatch.setattr(cast_kernel, "_cast_transpose_eager", op, raising=False)
    monkeypatch.setattr(cast_kernel, "cast_with_stored_scale", stored)
    monkeypatch.setattr(cast_kernel, "fits", lambda x, dtype: x.dim() == 2)
    if mode == "traced":  # e.g. a buffer still a DTensor: no direct launch
        monkeypatch.setattr(cast_kernel, "launches_directly", lambda *t: False)
    got = _gather_shard(recipe, "auto", training)
    record = recipe == "delayed" and training
    if recipe == "tensorwise":
        assert calls == [(True, False, False)]
    elif mode == "traced":
        assert calls == [(True, False, record)]
    else:
        assert calls == [("stored", record)]
    assert torch.equal(got[0], ref[0]) and got[0].dtype == torch.uint8 and torch.equal(got[1], ref[1])
    assert got[1].item() == 32.0
    if recipe == "delayed":
        assert torch.equal(got[2], ref[2]) and bool(got[2] > 0) == record
    _gather_shard(recipe, "torch", training)
    assert len(calls) == 1  # cast_kernel="torch" keeps torch ops


def test_empty_fsdp_shard_records_nothing():
    """A weight with fewer rows than ranks leaves some ranks an empty shard: it casts to padding and
    records no amax (the other ranks' shards carry it)."""
    cfg = Float8LinearConfig.from_recipe_name("delayed", enable_fsdp_float8_all_gather=True)
    lin = fp8train.Float8Linear(32, 4, bias=False, config=cfg)
    lin.is_amax_initialized = True
    w = lin.weight
    w._tensor = torch.empty(0, 32)

    class EightRanks(_OneRankMesh):
        def size(self) -> int:
            return 8

    (data,), (scale, _, _) = w.fsdp_pre_all_gather(EightRanks(), torch.Size([4, 32]), (32, 1), lin, None)
    assert data.shape == (1, 32) and data.dtype == torch.uint8 and scale.item() == 1.0
    assert lin.fp8_amax_weight.item() == 0.0


def test_precast_groups_shards_per_dtype_and_casts_the_rest_one_by_one(monkeypatch):
    """``precompute_float8_dynamic_scale_for_fsdp``'s precast: one ``cast_group`` call per (shard
    dtype, fp8 dtype), layers with ``cast_kernel="torch"`` cast one by one; afterwards the forward
    and backward all-gathers return those bytes without casting, until an optimizer step or an
    in-place edit (then the layer casts afresh with its own scale: here a collective on the mesh)."""
    from fp8train import fsdp

    groups = []

    def group(xs, scales, dtype):  # cast_group's contract in torch ops
        groups.append((xs[0].dtype, dtype, len(xs)))
        return [saturated_cast(x, s, dtype) for x, s in zip(xs, scales)]

    monkeypatch.setattr(cast_kernel, "cast_group", group)
    monkeypatch.setattr(cast_kernel, "fits", lambda x, dtype: x.dim() == 2)
    torch.manual_seed(0)
    e5 = CastConfig(target_dtype=E5)
    configs = [Float8LinearConfig(enable_fsdp_float8_all_gather=True),
               Float8LinearConfig(enable_fsdp_float8_all_gather=True, cast_config_weight=e5),
               Float8LinearConfig(enable_fsdp_float8_all_gather=True, cast_kernel="torch"),
               Float8LinearConfig(enable_fsdp_float8_all_gather=True)]
    layers = [fp8train.Float8Linear(32, 16 + i, bias=False, config=c) for i, c in enumerate(configs)]
    layers[3].weight._tensor = layers[3].weight._tensor.to(torch.bfloat16)
    wrappers = [m.weight for m in layers]
    scales = torch.tensor([2.0, 3.0, 4.0, 5.0])
    for w, m, s in zip(wrappers, layers, scales):
        w._precomputed_scale, w._precomputed_at = s, fsdp._stamp(w, m)
    casts = []
    real = fsdp._cast_shard
    monkeypatch.setattr(fsdp, "_cast_shard", lambda *a, **k: casts.append(a[4]) or real(*a, **k))
    fsdp._precast(layers, wrappers, scales)
    assert sorted(groups, key=str) == sorted([(torch.float32, E4, 1), (torch.float32, E5, 1),
                                              (torch.bfloat16, E4, 1)], key=str)
    assert casts == ["torch"]

    def gather(i):
        w = wrappers[i]
        with torch.no_grad():
            return w.fsdp_pre_all_gather(_OneRankMesh(), w.shape, w.stride(), layers[i], None)

    for i, (m, w, s) in enumerate(zip(layers, wrappers, scales)):
        dtype = m.config.cast_config_weight.target_dtype
        (data,), (scale, got_dtype, _) = gather(i)
        assert torch.equal(data, saturated_cast(w._tensor, s, dtype).view(torch.uint8)) and scale == s
        assert got_dtype == dtype and gather(i)[0][0] is data  # a second all-gather (backward): the same bytes
    assert casts == ["torch"]  # no cast on the all-gather path
    with torch.no_grad():
        wrappers[0].mul_(2.0)
    with pytest.raises(AssertionError, match="collective"):  # stale: its own scale, all-reduced
        gather(0)
    assert gather(1)[0][0] is wrappers[1]._precast[1][0][0]  # the others keep theirs

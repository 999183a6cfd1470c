"""Float8SwiGLU: the fused SwiGLU feed-forward against its three layers run one by one, the swap
that builds it, its fallbacks, and (GPU) the Triton kernels against their torch reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fp8train
from _helpers import sqnr
from fp8train import Float8LinearConfig, Float8SwiGLU, swiglu_kernel
from fp8train.linear import Float8Linear
from fp8train.models.llama import FeedForward, Llama, LlamaConfig
from fp8train.scaling import saturated_cast

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2


def _ffn(dim=64, hidden=128, seed=0):
    torch.manual_seed(seed)
    return FeedForward(dim, hidden)


def _pair(recipe, fuse_kw=None, **overrides):
    """(unfused, fused) copies of one FeedForward converted with ``recipe``."""
    base = _ffn()
    cfg = Float8LinearConfig.from_recipe_name(recipe, **overrides)
    plain = fp8train.convert_to_float8_training(copy.deepcopy(base), config=cfg, fuse_swiglu=False)
    fused = nn.Sequential(copy.deepcopy(base))  # a parent, so the swap can replace the FeedForward
    fp8train.convert_to_float8_training(fused, config=cfg, fuse_swiglu=True)
    return plain, fused[0]


def _step(m, x, dy, sync):
    x = x.clone().requires_grad_()
    y = m(x)
    y.backward(dy)
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in m.named_parameters()}
    if sync:
        fp8train.sync_float8_amax_and_scale_history(m)
    m.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


# --- CPU: the fused function computes what the three layers compute ------------------------------
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fused_equals_the_three_layers_in_fp32(recipe):
    """In fp32 both paths cast the same values with the same scales: they agree but for the odd fp8
    rounding flip where silu's last fp32 bit differs (a * sigmoid(a) vs torch's silu), over steps
    with delayed syncs in between; the delayed buffers agree too. (Two independent fp8 roundings
    would be ~30 dB apart; measured here: outputs >= 65 dB, gradients >= 55 dB.)"""
    plain, fused = _pair(recipe)
    assert isinstance(fused, Float8SwiGLU) and fused.unfused_reason(torch.zeros(1, 64)) is None
    delayed = recipe == "delayed"
    torch.manual_seed(1)
    for _ in range(3):
        x, dy = torch.randn(2, 32, 64), torch.randn(2, 32, 64)
        y0, dx0, g0 = _step(plain, x, dy, delayed)
        y1, dx1, g1 = _step(fused, x, dy, delayed)
        assert sqnr(y1, y0) > 50
        assert sqnr(dx1, dx0) > 45
        for n in g0:
            assert sqnr(g1[n], g0[n]) > 45, n
    b0, b1 = dict(plain.named_buffers()), dict(fused.named_buffers())
    assert b0.keys() == b1.keys() and (len(b0) > 0) == delayed
    for n in b0:
        torch.testing.assert_close(b1[n], b0[n], rtol=1e-4, atol=0, msg=n)


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_bf16_accuracy_against_fp32_reference_matches_the_three_layers(recipe):
    """Under bf16 autocast the fused path computes silu(h1) * h3 in fp32 before its fp8 cast (the
    layers round it to bf16 first): against an fp32 model both land at the same SQNR (measured on
    this test's data: output ~26 dB, weight gradients 18-27 dB), within 1 dB of each other."""
    plain, fused = _pair(recipe)
    ref = copy.deepcopy(_ffn())
    torch.manual_seed(2)
    for _ in range(2):  # delayed: one step to warm the scales, then the measured one
        x, dy = torch.randn(4, 64, 64), torch.randn(4, 64, 64)
        outs = {}
        for name, m in (("plain", plain), ("fused", fused)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs[name] = _step(m, x, dy, recipe == "delayed")
        yr, dxr, gr = _step(ref, x, dy, False)
    for name in outs:
        y, dx, g = outs[name]
        assert sqnr(y.float(), yr) > 22, name
        assert sqnr(dx.float(), dxr) > 18, name
    for part in range(2):
        a, b = (outs[k][part].float() for k in ("plain", "fused"))
        ref_t = (yr, dxr)[part]
        assert abs(sqnr(a, ref_t) - sqnr(b, ref_t)) < 1.0
    for n in gr:
        assert abs(sqnr(outs["plain"][2][n], gr[n]) - sqnr(outs["fused"][2][n], gr[n])) < 1.0, n


@pytest.mark.parametrize("frozen", [(), ("x",), ("w1",), ("w2",), ("w1", "w3"), ("x", "w1", "w3")])
def test_partial_gradients_match(frozen):
    """Frozen weights / an input without gradient: the fused backward computes exactly the grads asked for."""
    plain, fused = _pair("tensorwise")
    for m in (plain, fused):
        for n in ("w1", "w2", "w3"):
            getattr(m, n).weight.requires_grad_(n not in frozen)
    torch.manual_seed(3)
    x, dy = torch.randn(64, 64, requires_grad="x" not in frozen), torch.randn(64, 64)
    res = []
    for m in (plain, fused):
        xi = x.detach().clone().requires_grad_(x.requires_grad)
        m(xi).backward(dy)
        res.append((xi.grad, {n: getattr(m, n).weight.grad for n in ("w1", "w2", "w3")}))
    (dx0, g0), (dx1, g1) = res
    assert (dx1 is None) == ("x" in frozen) and (dx0 is None) == (dx1 is None)
    if dx0 is not None:
        assert sqnr(dx1, dx0) > 50
    for n in g0:
        assert (g1[n] is None) == (n in frozen)
        if g0[n] is not None:
            assert sqnr(g1[n], g0[n]) > 50, n


def test_no_grad_forward_matches_and_records_nothing_in_eval():
    plain, fused = _pair("delayed")
    plain.eval(), fused.eval()
    before = {n: b.clone() for n, b in fused.named_buffers()}
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert sqnr(fused(x), plain(x)) > 100
    for n, b in fused.named_buffers():
        assert torch.equal(b, before[n]), n


def test_weight_cast_cache_reuse_gives_the_same_step():
    """Gradient accumulation with cached weight casts: the fused path fills and reuses each layer's cache."""
    plain, fused = _pair("tensorwise")
    torch.manual_seed(4)
    xs = [torch.randn(32, 64) for _ in range(2)]
    dy = torch.randn(32, 64)
    grads = []
    for m in (plain, fused):
        for i, x in enumerate(xs):
            fp8train.set_weight_cast_cache(m, "fill" if i == 0 else "reuse")
            m(x).backward(dy)
        fp8train.set_weight_cast_cache(m, "off")
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert all(sqnr(grads[1][n], grads[0][n]) > 50 for n in grads[0])
    assert fused.w1.fp8_weight_cache.dtype == E4  # the fused path filled the layer's own cache


# --- fallbacks -----------------------------------------------------------------------------------
def test_falls_back_to_the_layers_and_says_why():
    _, fused = _pair("tensorwise")
    x = torch.randn(8, 64)
    assert fused.unfused_reason(x) is None
    fused.w2.fp8_enabled = False  # the divergence guard's bf16 fallback
    assert "fp8_enabled=False" in fused.unfused_reason(x)
    y = fused(x)
    want = fused.w2(F.silu(fused.w1(x)) * fused.w3(x))
    torch.testing.assert_close(y, want)
    fused.w2.fp8_enabled = True
    h = fused.w1.register_forward_hook(lambda *a: None)  # fp8 statistics hook the layers
    assert "hooks" in fused.unfused_reason(x)
    h.remove()
    fused.fused = False
    assert fused.unfused_reason(x) == "fused=False"
    fused.fused = True
    assert "features" in fused.unfused_reason(torch.randn(2, 32))


def test_hooked_layers_see_their_calls():
    """A forward hook on a layer (how OperandProbe measures) runs: the module takes the unfused path."""
    _, fused = _pair("tensorwise")
    seen = []
    fused.w3.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    fused(torch.randn(5, 64)).sum().backward()
    assert seen == [torch.Size([5, 128])]


# --- the swap ------------------------------------------------------------------------------------
def test_swap_on_the_built_in_llama_keeps_names_and_checkpoints():
    cfg = LlamaConfig.from_name("llama_tiny")
    torch.manual_seed(0)
    model = Llama(cfg)
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_modules()]
    fp8train.convert_to_float8_training(model, config="delayed", fuse_swiglu=True,
                                        module_filter_fn=lambda m, fqn: fqn != "lm_head")
    report = fp8train.conversion_report(model)
    assert report.fused_swiglu == [f"layers.{i}.feed_forward" for i in range(cfg.n_layers)]
    assert "SwiGLU feed-forwards fused" in report.table()
    assert all(isinstance(b.feed_forward, Float8SwiGLU) for b in model.layers)
    assert [k for k in model.state_dict() if "fp8_" not in k] == keys
    assert [n for n, _ in model.named_modules()] == names
    assert len(report.converted) == 7 * cfg.n_layers
    # idempotent: a second pass leaves everything as it is
    fp8train.convert_to_float8_training(model, config="delayed", fuse_swiglu=True)
    assert all(isinstance(b.feed_forward, Float8SwiGLU) for b in model.layers)


def test_default_fuses_only_where_fp8_runs_for_speed():
    for kwargs in ({}, {"config": Float8LinearConfig(emulate=True)}):
        model = nn.Sequential(_ffn())
        fp8train.convert_to_float8_training(model, auto_filter=False, **kwargs)  # (CUDA: too small to pay)
        expect = torch.cuda.is_available() and not kwargs
        assert isinstance(model[0], Float8SwiGLU) == expect


@pytest.mark.parametrize("recipe", ["rowwise", "mxfp8"])
def test_recipes_whose_casts_cannot_fuse_keep_the_plain_module(recipe):
    model = nn.Sequential(_ffn())
    fp8train.convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe, emulate=True),
                                        fuse_swiglu=True)
    assert isinstance(model[0], FeedForward) and isinstance(model[0].w1, Float8Linear)
    assert fp8train.conversion_report(model).fused_swiglu == []


def test_a_layer_left_in_high_precision_keeps_the_plain_module():
    model = nn.Sequential(_ffn())
    fp8train.convert_to_float8_training(model, fuse_swiglu=True, module_filter_fn=lambda m, fqn: not fqn.endswith("w2"))
    assert isinstance(model[0], FeedForward) and type(model[0].w2) is nn.Linear


def test_fuse_swiglu_rejects_non_bools():
    with pytest.raises(ValueError, match=r"fuse_swiglu='yes' is invalid; valid: None \(auto\), True or False"):
        fp8train.convert_to_float8_training(nn.Sequential(_ffn()), fuse_swiglu="yes")
    from fp8train.lightning import Float8Training
    with pytest.raises(ValueError, match="fuse_swiglu"):
        Float8Training(fuse_swiglu=1)


class _HFStyleMLP(nn.Module):
    def __init__(self, d=64, f=128, swap=False):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), \
            nn.Linear(f, d, bias=False)
        self.swap = swap

    def forward(self, x):
        a, b = self.gate_proj(x), self.up_proj(x)
        if self.swap:
            a, b = b, a
        return self.down_proj(F.silu(a) * b)


def test_register_swiglu_for_a_user_class_and_a_wrong_declaration_raises():
    fp8train.register_swiglu(_HFStyleMLP, gate="gate_proj", up="up_proj", down="down_proj")
    model = nn.Sequential(_HFStyleMLP())
    fp8train.convert_to_float8_training(model, fuse_swiglu=True)
    assert isinstance(model[0], Float8SwiGLU) and model[0].down is model[0].down_proj
    assert [n for n, _ in model[0].named_children()] == ["gate_proj", "up_proj", "down_proj"]
    model[0](torch.randn(4, 64)).sum().backward()
    bad = nn.Sequential(_HFStyleMLP(swap=True))
    before = copy.deepcopy(bad.state_dict())
    with pytest.raises(ValueError, match=r"_HFStyleMLP is registered as a SwiGLU with gate='gate_proj'.*register_swiglu"):
        fp8train.convert_to_float8_training(bad, fuse_swiglu=True)
    assert type(bad[0].gate_proj) is nn.Linear  # nothing swapped before the error
    assert all(torch.equal(v, bad.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("args, match", [
    ((int, "a", "b", "c"), "an nn.Module subclass"),
    ((nn.Module, "a", "a", "c"), "three distinct attribute names"),
    ((nn.Module, "a", "", "c"), "three distinct attribute names"),
])
def test_register_swiglu_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        fp8train.register_swiglu(*args)


def test_constructor_rejects_bad_names():
    lin = Float8Linear(64, 128, bias=False)
    with pytest.raises(ValueError, match="three distinct attribute names"):
        Float8SwiGLU(lin, lin, lin, names=("a", "a", "b"))
    with pytest.raises(ValueError, match="an ordering of names"):
        Float8SwiGLU(lin, lin, lin, names=("a", "b", "c"), order=("a", "b", "x"))


def test_compiled_fused_module_matches_eager():
    """Under torch.compile (inductor, CPU) the fused function traces in one graph and matches eager."""
    _, fused = _pair("tensorwise")
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True)
    torch.manual_seed(5)
    x, dy = torch.randn(64, 64), torch.randn(64, 64)
    y0, dx0, g0 = _step(fused, x, dy, False)
    y1, dx1, g1 = _step(compiled, x, dy, False)
    assert sqnr(y1, y0) > 60 and sqnr(dx1, dx0) > 40
    assert all(sqnr(g1[n], g0[n]) > 40 for n in g0)


def test_lightning_callback_fuses_and_trains(tmp_path):
    import lightning as L

    from fp8train.lightning import Float8Training
    from fp8train.train.module import LlamaLightningModule

    cfg = LlamaConfig.from_name("llama_tiny")
    module = LlamaLightningModule(cfg)
    cb = Float8Training("delayed", skip=["lm_head"], fuse_swiglu=True, stats="off")
    tokens = torch.randint(0, cfg.vocab_size, (8, 33))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                        default_root_dir=tmp_path)
    trainer.fit(module, data)
    ffn = module.model.layers[0].feed_forward
    assert isinstance(ffn, Float8SwiGLU)
    assert cb._report.fused_swiglu == [f"model.layers.{i}.feed_forward" for i in range(cfg.n_layers)]
    assert f"{cfg.n_layers} SwiGLU feed-forwards fused" in cb._report.table()
    assert bool(ffn.w1.is_amax_initialized) and float(ffn.w2.fp8_amax_history_input.abs().sum()) > 0


# --- GPU: kernels against the torch reference ----------------------------------------------------
def _needs_kernel():
    from fp8train import cast_kernel

    if not torch.cuda.is_available() or not cast_kernel.supports(torch.device("cuda")):
        pytest.skip("needs Triton and a GPU of compute capability 8.9+")


def _close_bytes(got, want, frac=1e-3):
    """Equal fp8 bytes but for a fraction ``frac`` one step apart (the kernel's sigmoid and torch's
    may differ in the last fp32 bit, which flips a rounding now and then)."""
    same = got.view(torch.uint8) == want.view(torch.uint8)
    assert same.float().mean() >= 1 - frac, same.float().mean()
    g, w = got.float(), want.float()
    assert ((g - w).abs() <= w.abs() * 0.26 + 2.0**-9)[~same].all()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 1024), (1000, 300), (64, 64), (1, 17)])
@pytest.mark.parametrize("src", [torch.bfloat16, torch.float32])
def test_kernels_match_the_torch_reference(shape, src):
    _needs_kernel()
    torch.manual_seed(0)
    h1, h3, dg = ((torch.randn(shape, device="cuda") * 3).to(src) for _ in range(3))
    g = swiglu_kernel.swiglu_reference(h1, h3)
    sg = fp8train.scaling.amax_to_scale(g.abs().amax(), E4)
    g8, amax = swiglu_kernel.swiglu_cast(h1, h3, sg, E4, amax=True)
    _close_bytes(g8, saturated_cast(g, sg, E4))
    torch.testing.assert_close(amax, g.abs().amax(), rtol=1e-6, atol=0)
    assert swiglu_kernel.swiglu_cast(h1, h3, sg, E4, store=False, amax=True)[0] is None
    d1, d3 = swiglu_kernel.swiglu_backward_reference(dg, h1, h3)
    s1, s3 = (fp8train.scaling.amax_to_scale(d.abs().amax(), E5) for d in (d1, d3))
    a, at, b, bt, gt, am1, am3 = swiglu_kernel.swiglu_backward_cast(
        dg, h1, h3, scale_g=sg, scale_dh1=s1, scale_dh3=s3, g_dtype=E4, grad_dtype=E5, amax=True)
    for got, ref in ((a, saturated_cast(d1, s1, E5)), (b, saturated_cast(d3, s3, E5))):
        _close_bytes(got, ref)
    for rows_major, t in ((a, at), (b, bt)):
        assert torch.equal(t.view(torch.uint8), rows_major.t().contiguous().view(torch.uint8))
    assert torch.equal(gt.view(torch.uint8), g8.t().contiguous().view(torch.uint8))  # the forward's bytes
    torch.testing.assert_close(am1, d1.abs().amax(), rtol=1e-5, atol=0)
    torch.testing.assert_close(am3, d3.abs().amax(), rtol=1e-5, atol=0)
    only_t = swiglu_kernel.swiglu_backward_cast(dg, h1, h3, scale_g=sg, scale_dh1=s1, scale_dh3=s3, g_dtype=E4,
                                                grad_dtype=E5, rows=False, g_transposed=False)
    assert only_t[0] is None and only_t[4] is None and torch.equal(only_t[1].view(torch.uint8), at.view(torch.uint8))


@pytest.mark.gpu
def test_kernel_nan_makes_the_amax_infinite():
    _needs_kernel()
    h1, h3 = torch.randn(128, 256, device="cuda").bfloat16(), torch.randn(128, 256, device="cuda").bfloat16()
    h1[5, 7] = float("nan")
    _, amax = swiglu_kernel.swiglu_cast(h1, h3, torch.tensor(1.0, device="cuda"), E4, store=False, amax=True)
    assert amax.item() == float("inf")


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_gpu_fused_compiled_matches_the_three_layers(recipe):
    """CUDA, bf16 autocast, compiled: the fused module (Triton kernels) and the three layers land at
    the same SQNR against an fp32 model, within 1 dB."""
    _needs_kernel()
    torch.manual_seed(0)
    base = FeedForward(1024, 4096).cuda()
    ref = copy.deepcopy(base)
    plain = fp8train.convert_to_float8_training(copy.deepcopy(base), config=recipe, fuse_swiglu=False,
                                                auto_filter=False)
    holder = nn.Sequential(copy.deepcopy(base))
    fp8train.convert_to_float8_training(holder, config=recipe, fuse_swiglu=True, auto_filter=False)
    fused = holder[0]
    assert isinstance(fused, Float8SwiGLU)
    torch._dynamo.reset()
    runs = {"plain": torch.compile(plain), "fused": torch.compile(fused, fullgraph=True)}
    for _ in range(3):
        x, dy = torch.randn(4096, 1024, device="cuda"), torch.randn(4096, 1024, device="cuda")
        outs = {}
        for name, m in runs.items():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                outs[name] = _step(m, x, dy, recipe == "delayed")
        want = _step(ref, x, dy, False)
    for part in range(2):
        a, b = (sqnr(outs[k][part].float(), want[part]) for k in ("plain", "fused"))
        assert a > 20 and abs(a - b) < 1.0, (part, a, b)
    for n in want[2]:
        a, b = (sqnr(outs[k][2][n], want[2][n]) for k in ("plain", "fused"))
        assert abs(a - b) < 1.0, (n, a, b)


def test_eager_code_launches_the_kernels_directly_and_traced_code_uses_the_ops(monkeypatch):
    """As for fp8train.cast_kernel: the ops wherever something traces, direct launches in plain eager code."""
    from torch.fx.experimental.proxy_tensor import make_fx

    used = []

    def fwd(h1, h3, scale, dtype, store, amax):
        return saturated_cast(swiglu_kernel.swiglu_reference(h1, h3), scale, dtype), torch.zeros(1)

    def bwd(*args):
        return tuple(torch.zeros(1) for _ in range(7))

    def fwd_op(*args):
        used.append("op")
        return fwd(*args)

    def fwd_impl(launch, *args):
        used.append("direct")
        return fwd(*args)

    def bwd_op(*args):
        used.append("op")
        return bwd(*args)

    def bwd_impl(launch, *args):
        used.append("direct")
        return bwd(*args)

    for name, fn in (("_swiglu_fwd_op", fwd_op), ("_swiglu_fwd_impl", fwd_impl), ("_swiglu_bwd_op", bwd_op),
                     ("_swiglu_bwd_impl", bwd_impl)):
        monkeypatch.setattr(swiglu_kernel, name, fn, raising=False)
    monkeypatch.setattr(swiglu_kernel, "fits", lambda *t: True)
    h1, h3 = torch.randn(4, 8), torch.randn(4, 8)
    one = torch.tensor(1.0)

    def both(a, b):
        g8, _ = swiglu_kernel.swiglu_cast(a, b, one, torch.float8_e4m3fn)
        swiglu_kernel.swiglu_backward_cast(a, a, b, scale_g=one, scale_dh1=one, scale_dh3=one,
                                           g_dtype=torch.float8_e4m3fn, grad_dtype=torch.float8_e5m2)
        return g8.float()

    both(h1, h3)
    assert used == ["direct", "direct"]
    make_fx(both)(h1, h3)
    assert used[2:] == ["op", "op"]


def test_kernels_under_the_triton_interpreter():
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    script = Path(__file__).parent / "scripts" / "swiglu_kernel_interpreted.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=dict(os.environ, TRITON_INTERPRET="1"), timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok" in out.stdout


def test_conversion_check_leaves_rng_and_train_flags_alone():
    """The conversion-time check runs the module once: the global RNG and each child's train flag
    are as before (a drawn init or dropout mask must not depend on fuse_swiglu)."""
    draws = []
    for fuse in (True, False):
        model = nn.Sequential(_ffn())
        model[0].w2.eval()
        torch.manual_seed(7)
        fp8train.convert_to_float8_training(model, fuse_swiglu=fuse)
        draws.append(torch.randn(3))
        assert model[0].training and model[0].w1.training and not model[0].w2.training
    assert torch.equal(draws[0], draws[1])


class _MLPWithState(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(64, 128, bias=False), nn.Linear(128, 64, bias=False), \
            nn.Linear(64, 128, bias=False)
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x)) * self.gain


def test_modules_holding_more_than_the_three_layers_are_not_replaced():
    fp8train.register_swiglu(_MLPWithState, gate="w1", up="w3", down="w2")
    model = nn.Sequential(_MLPWithState())
    keys = set(model.state_dict())
    fp8train.convert_to_float8_training(model, fuse_swiglu=True)
    assert type(model[0]) is _MLPWithState and set(model.state_dict()) == keys
    hooked = nn.Sequential(_ffn())
    calls = []
    hooked[0].register_forward_hook(lambda *a: calls.append(1))
    fp8train.convert_to_float8_training(hooked, fuse_swiglu=True)
    assert type(hooked[0]) is FeedForward and calls == []  # not replaced, and its hook not run by a check


def test_backward_hooks_on_a_layer_take_the_unfused_path():
    _, fused = _pair("tensorwise")
    fused.w2.register_full_backward_hook(lambda *a: None)
    assert "hooks" in fused.unfused_reason(torch.randn(2, 64))


def test_a_gradient_nobody_needs_records_no_amax():
    """Frozen gate weight and an input without gradient: run as layers the gate's backward never
    runs, so its grad_output amax stays untouched; fused, the same."""
    plain, fused = _pair("delayed")
    for m in (plain, fused):
        m.w1.weight.requires_grad_(False)
        m(torch.randn(16, 64)).sum().backward()
    assert float(plain.w1.fp8_amax_grad_output) == 0.0 == float(fused.w1.fp8_amax_grad_output)
    assert float(fused.w3.fp8_amax_grad_output) > 0

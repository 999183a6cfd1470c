import pytest
import torch

from fp8train import Float8Tensor, GemmInputRole, from_float8, to_float8
from fp8train.scaling import amax_to_scale, cast_dynamic, fp8_max, tensor_amax
from _helpers import sqnr


def _f8(x: torch.Tensor, role=GemmInputRole.INPUT) -> Float8Tensor:
    return cast_dynamic(x, torch.float8_e4m3fn, role=role)


def test_round_trip_sqnr_and_metadata():
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    t = _f8(x)
    assert isinstance(t, Float8Tensor) and t.dtype == torch.bfloat16 and t._data.dtype == torch.float8_e4m3fn
    assert t.shape == x.shape
    assert sqnr(t.dequantize(), x) > 28  # measured 31.4 dB (one e4m3 rounding of randn)


def test_zero_tensor_has_finite_scale():
    s = amax_to_scale(tensor_amax(torch.zeros(8)), torch.float8_e4m3fn)
    assert torch.isfinite(s)
    assert torch.equal(_f8(torch.zeros(4, 4)).dequantize(), torch.zeros(4, 4))


def test_power_of_two_scales():
    s = amax_to_scale(torch.tensor([3.0, 0.1, 1000.0]), torch.float8_e5m2, round_to_power_of_2=True)
    assert torch.equal(torch.log2(s), torch.floor(torch.log2(s)))
    assert (s * torch.tensor([3.0, 0.1, 1000.0]) <= fp8_max(torch.float8_e5m2)).all()


def test_floor_pow2_exact_at_boundaries():
    from fp8train.scaling import floor_pow2

    x = torch.tensor([1.0, 255.99998, 256.0, 256.00003, 3e-30, 1.7e38])
    want = torch.tensor([1.0, 128.0, 256.0, 256.0, 2.0**-99, 2.0**126])
    assert torch.equal(floor_pow2(x), want)
    compiled = torch.compile(floor_pow2, fullgraph=True)
    assert torch.equal(compiled(x), want)


def test_saturating_cast_never_overflows():
    x = torch.tensor([1.0, 1e6, -1e6])
    t = to_float8(x, torch.tensor(1.0), torch.float8_e4m3fn)
    assert torch.equal(t._data.float(), torch.tensor([1.0, 448.0, -448.0]))


def test_axiswise_scales_shape():
    x = torch.randn(16, 32)
    t = cast_dynamic(x, torch.float8_e4m3fn, reduce_dim=-1)
    assert t._scale.shape == (16, 1) and t._axiswise_dim == 1
    tt = t.t()
    assert tt._scale.shape == (1, 16) and tt._axiswise_dim == 0
    torch.testing.assert_close(tt.dequantize(), t.dequantize().t())


def test_casts_are_differentiable_pass_through():
    x = torch.randn(8, 16, requires_grad=True)
    t = to_float8(x, amax_to_scale(tensor_amax(x.detach()), torch.float8_e4m3fn), torch.float8_e4m3fn)
    y = from_float8(t)
    (y * 3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))


def test_mm_dispatches_to_scaled_mm():
    a, b = torch.randn(32, 64), torch.randn(48, 64)
    fa = _f8(a)
    fb = _f8(b, GemmInputRole.WEIGHT)
    y = torch.mm(fa, fb.t())
    assert not isinstance(y, Float8Tensor)
    assert sqnr(y, a @ b.t()) > 25
    bias = torch.randn(48)
    y2 = torch.addmm(bias, fa, fb.t())
    torch.testing.assert_close(y2, y + bias)


def test_layout_ops():
    t = _f8(torch.randn(8, 16))
    for op in (
        lambda t: t.t(), lambda t: t.transpose(0, 1), lambda t: t.view(16, 8), lambda t: t.reshape(128),
        lambda t: t.clone(), lambda t: t.detach(), lambda t: t[2:4], lambda t: t.contiguous(),
    ):
        r = op(t)
        assert isinstance(r, Float8Tensor)
        torch.testing.assert_close(r.dequantize(), op(t.dequantize()))
    parts = torch.split(t, 4)
    assert all(isinstance(p, Float8Tensor) for p in parts)
    c = torch.cat(parts)
    assert torch.equal(c._data.view(torch.uint8), t._data.view(torch.uint8))
    moved = t.to(torch.bfloat16)
    assert moved.dtype == torch.bfloat16 and isinstance(moved, Float8Tensor)


def test_unknown_op_names_the_op():
    t = _f8(torch.randn(4, 4))
    with pytest.raises(NotImplementedError, match="aten.sin"):
        torch.sin(t)


def test_flatten_unflatten_round_trip():
    t = cast_dynamic(torch.randn(4, 8), torch.float8_e5m2, reduce_dim=-1, role=GemmInputRole.GRAD_OUTPUT)
    names, ctx = t.__tensor_flatten__()
    r = Float8Tensor.__tensor_unflatten__({n: getattr(t, n) for n in names}, ctx, t.shape, t.stride())
    assert r._gemm_input_role is GemmInputRole.GRAD_OUTPUT and r._axiswise_dim == 1
    assert torch.equal(r.dequantize(), t.dequantize())


def test_compile_traces_float8_tensor():
    def f(x, w):
        return torch.mm(_f8(x), _f8(w, GemmInputRole.WEIGHT).t())

    x, w = torch.randn(16, 32), torch.randn(16, 32)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w)
    torch.testing.assert_close(got, f(x, w))

"""Range diagnostics on hand-made payloads with known answers: plain fp8 / int8 data with
tensorwise and axiswise scales, Float8Tensor, MXTensor."""

import math

import pytest
import torch

from fp8train.diagnostics import saturation_fraction, underflow_fraction, wasted_bits
from fp8train.mx import to_mx
from fp8train.tensor import Float8Tensor

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def fp8(values, dtype=E4M3):
    return torch.tensor(values, dtype=torch.float32).to(dtype)


def test_wasted_bits_tensorwise():
    assert float(wasted_bits(fp8([28.0, -7.0, 0.0]))) == 4.0  # 448 / 28 = 2**4
    assert float(wasted_bits(fp8([-448.0, 1.0]))) == 0.0
    assert float(wasted_bits(fp8([57344.0 / 8], E5M2))) == 3.0
    assert float(wasted_bits(fp8([1.0, 2.0]), scale=torch.tensor(3.0))) == pytest.approx(math.log2(224))
    # an integer payload wastes literally bits: amax 1 of 127
    assert float(wasted_bits(torch.tensor([1, 0, -1], dtype=torch.int8))) == pytest.approx(math.log2(127))
    assert float(wasted_bits(torch.tensor([127, -3], dtype=torch.int8))) == 0.0


def test_wasted_bits_of_zeros_is_the_whole_range():
    assert float(wasted_bits(fp8([0.0, 0.0]))) == pytest.approx(math.log2(448) + 9)  # tiny = 2**-9
    assert float(wasted_bits(fp8([0.0], E5M2))) == pytest.approx(math.log2(57344) + 16)


def test_wasted_bits_axiswise_groups_follow_the_scale_shape():
    data = fp8([[448.0, 1.0], [112.0, 2.0]])
    assert float(wasted_bits(data, scale=torch.ones(2, 1))) == 1.0  # rows: 0 and 2 bits
    assert float(wasted_bits(data, scale=torch.tensor(1.0))) == 0.0  # one group
    # scale [2] broadcasts along rows: one group per column, amax 448 and 2
    assert float(wasted_bits(data, scale=torch.ones(2))) == pytest.approx(math.log2(224) / 2)
    # a zero row is left out of the mean
    data = fp8([[448.0 / 4, 1.0], [0.0, 0.0]])
    assert float(wasted_bits(data, scale=torch.ones(2, 1))) == 2.0
    with pytest.raises(ValueError, match="scale.shape"):
        wasted_bits(data, scale=torch.ones(3, 1))


def test_float8tensor_payload_uses_its_own_scale():
    data = fp8([[448.0, 1.0], [112.0, 2.0]])
    t = Float8Tensor(data, torch.ones(2, 1), torch.float32, axiswise_dim=-1)
    assert float(wasted_bits(t)) == 1.0
    assert float(saturation_fraction(t)) == 0.25
    with pytest.raises(ValueError, match="carries its own scale"):
        wasted_bits(t, scale=torch.ones(2, 1))


def test_saturation_fraction():
    assert float(saturation_fraction(fp8([448.0, -448.0, 1.0, 2.0]))) == 0.5
    # a non-saturating e5m2 cast keeps inf; it counts as saturated
    assert float(saturation_fraction(torch.tensor([float("inf"), 1.0, 2.0, 57344.0]).to(E5M2))) == 0.5
    assert float(saturation_fraction(torch.tensor([-127, 5], dtype=torch.int8))) == 0.5


def test_underflow_fraction():
    hp = torch.tensor([1.0, 1e-4, 0.0, 2.0, -3e-4])
    # e4m3's smallest subnormal is 2**-9; half of it (~9.8e-4) and below round to 0
    assert float(underflow_fraction(hp, hp.to(E4M3))) == pytest.approx(2 / 4)
    assert float(underflow_fraction(torch.zeros(3), fp8([0.0, 0.0, 0.0]))) == 0.0
    with pytest.raises(ValueError, match="hp.shape"):
        underflow_fraction(torch.ones(4), fp8([1.0, 2.0]))


def test_mx_payload():
    # a block of ones: exponent 0 - 8, elements 256, so log2(448 / 256) bits are wasted
    x = torch.ones(1, 64)
    x[0, 32:] = 0.0  # a zero block, left out of the mean
    mx = to_mx(x, "fp8_e4m3")
    assert float(wasted_bits(mx)) == pytest.approx(math.log2(448 / 256))
    # fp4: amax 1 → exponent -2, elements 4 of max 6
    assert float(wasted_bits(to_mx(torch.ones(1, 32), "fp4_e2m1"))) == pytest.approx(math.log2(6 / 4))
    assert float(wasted_bits(to_mx(torch.zeros(1, 32), "fp4_e2m1"))) == pytest.approx(math.log2(6 / 0.5))
    with pytest.raises(ValueError, match="MXTensor carries its own"):
        wasted_bits(mx, scale=torch.ones(()))
    with pytest.raises(ValueError, match="pass the MXTensor itself"):
        wasted_bits(to_mx(torch.ones(1, 32), "fp6_e2m3").qdata)


def test_mx_saturation_counts_real_elements_only():
    # [500, 1, ..., 1]: exponent floor(log2 500) - 8 = 0, 500 clamps to 448; then an 8-element tail
    x = torch.ones(1, 40)
    x[0, 0] = 500.0
    mx = to_mx(x, "fp8_e4m3")
    assert float(saturation_fraction(mx)) == pytest.approx(1 / 40)  # padding of the tail not counted


def test_mx_underflow_and_nan_blocks():
    x = torch.ones(1, 96)
    x[0, 1] = 2.0**-20  # block amax 1 → scaled by 2**8 to 2**-12 < half of e4m3's smallest 2**-9
    x[0, 33] = float("nan")  # NaN block: stored as zeros, not counted as underflow
    mx = to_mx(x, "fp8_e4m3")
    assert float(underflow_fraction(x, mx)) == pytest.approx(1 / 64)
    assert float(saturation_fraction(mx)) == 0.0
    assert float(wasted_bits(mx)) == pytest.approx(math.log2(448 / 256))  # NaN block left out


def test_results_are_0dim_and_trace_without_host_syncs():
    data, hp = fp8([[28.0, 1.0], [448.0, 0.0]]), torch.tensor([[28.0, 1.0], [448.0, 1e-6]])

    def stats(data, hp, scale):
        return wasted_bits(data, scale), saturation_fraction(data), underflow_fraction(hp, data)

    torch._dynamo.reset()
    # fullgraph fails on any .item() / data-dependent Python branch
    compiled = torch.compile(stats, backend="eager", fullgraph=True)
    out = compiled(data, hp, torch.ones(2, 1))
    ref = stats(data, hp, torch.ones(2, 1))
    for o, r in zip(out, ref):
        assert o.dim() == 0 and o.dtype == torch.float32
        assert torch.equal(o, r)
    assert float(ref[0]) == pytest.approx(math.log2(16) / 2)
    assert float(ref[1]) == 0.25 and float(ref[2]) == pytest.approx(1 / 4)


def test_bad_payload_dtype():
    with pytest.raises(ValueError, match="payload dtype"):
        wasted_bits(torch.ones(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="payload of type"):
        saturation_fraction([1.0])

"""Run fp8train.cast_kernel's Triton kernel under Triton's CPU interpreter against ``saturated_cast``
(used by tests/test_cast_kernel.py when Triton is installed). The interpreter's own fp32 -> fp8
conversion (Triton 3.9) is not the GPU's: it keeps the old exponent where the mantissa carries
into the next binade (half the right value), mis-rounds subnormals and turns NaN into a finite
value. So here: both layouts hold the same bytes, >= 90% of the elements match bit for bit, the
rest are within 2x (or one subnormal step), and the amax is right; the GPU tests compare every
element. Prints ``ok`` at the end."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch  # noqa: E402

from fp8train import cast_kernel  # noqa: E402
from fp8train.scaling import saturated_cast  # noqa: E402

torch.manual_seed(0)
for rows, cols, dtype, src in [(100, 300, torch.float8_e4m3fn, torch.bfloat16), (64, 128, torch.float8_e5m2, torch.float32),
                               (3, 1000, torch.float8_e4m3fn, torch.float32)]:
    x = (torch.randn(rows, cols) * 3).to(src)
    x[0, 0], x[1, 1] = 1e6, float("nan")  # saturates; NaN
    scale = torch.tensor(30.0)
    y, yt, partial = cast_kernel._cast_transpose_op(x, scale, dtype, True, True, True)
    ref = saturated_cast(x, scale, dtype)
    assert torch.equal(yt.t().view(torch.uint8), y.view(torch.uint8)), "layouts differ"
    yf, rf = y.float(), ref.float()
    same = y.view(torch.uint8) == ref.view(torch.uint8)
    finite = ~rf.isnan()
    close = ((yf - rf).abs() <= (rf.abs() / 2).clamp(min=2.0**-9)) | ~finite
    assert close.all(), (yf[~close][:5], rf[~close][:5])
    carry = ~same & finite
    assert carry.float().mean() < 0.1, carry.float().mean()
    assert partial.amax().item() == float("inf")  # the NaN
    x[1, 1] = 0
    _, _, partial = cast_kernel._cast_transpose_op(x, scale, dtype, False, True, True)
    assert partial.amax().item() == x.float().abs().max().item()
    print(rows, cols, dtype, src, f"carries {int(carry.sum())}/{x.numel()}")

# Bit for bit where no rounding happens: inputs that are fp8 values already (random finite bytes of
# the target format), scale 1, plus values that saturate (an inf among them: the interpreter turns
# NaN into a finite fp8 value, so no NaN here); every layout combination and strided inputs.
for dtype, src in [(torch.float8_e4m3fn, torch.bfloat16), (torch.float8_e5m2, torch.float32),
                   (torch.float8_e4m3fn, torch.float16)]:
    raw = torch.randint(0, 256, (70, 200), dtype=torch.uint8).view(dtype).float()
    x = torch.where(raw.isnan(), 0.0, raw)
    x[0, :4] = torch.tensor([1e5, -1e5, float("inf"), -0.0])
    x = x.to(src)
    one = torch.tensor(1.0)
    ref = saturated_cast(x, one, dtype).view(torch.uint8)
    for inp, want in ((x, ref), (x.t().contiguous().t(), ref), (x.t(), ref.t())):
        for rows_, cols_ in ((True, True), (True, False), (False, True)):
            y, yt, partial = cast_kernel._cast_transpose_op(inp, one, dtype, rows_, cols_, True)
            if rows_:
                assert torch.equal(y.view(torch.uint8), want), (dtype, src, rows_, cols_)
            if cols_:
                assert torch.equal(yt.view(torch.uint8), want.t()), (dtype, src, rows_, cols_)
            assert partial.amax().item() == float("inf")
    print("exact", dtype, src)

# eager code launches the kernel directly (not through the op): the same bytes
x = (torch.randn(70, 200) * 3).to(torch.bfloat16)
for args in ((True, True, True), (True, False, False), (False, True, True)):
    a = cast_kernel._cast_transpose_op(x, torch.tensor(8.0), torch.float8_e4m3fn, *args)
    b = cast_kernel._cast_transpose_eager(x, torch.tensor(8.0), torch.float8_e4m3fn, *args)
    assert all(torch.equal(u.view(torch.uint8) if u.dtype != torch.float32 else u,
                           v.view(torch.uint8) if v.dtype != torch.float32 else v) for u, v in zip(a, b)), args
print("eager launch")

# cast_with_stored_scale: one launch casting row-major, copying the scale, folding the amax atomically
cast_kernel.fits = cast_kernel._fits_shape  # CPU tensors under the interpreter
x = (torch.randn(130, 260) * 3).to(torch.bfloat16)
scale, amax = torch.tensor(16.0), torch.tensor(0.5)
y, scale_copy = cast_kernel.cast_with_stored_scale(x, scale, torch.float8_e4m3fn, amax)
assert amax.item() == x.float().abs().max().item() and scale_copy.item() == 16.0 and scale_copy is not scale
ref = saturated_cast(x, scale, torch.float8_e4m3fn)
assert ((y.float() - ref.float()).abs() <= ref.float().abs() / 2 + 2.0**-9).all()
big = torch.tensor(1e4)
cast_kernel.cast_with_stored_scale(x, scale, torch.float8_e4m3fn, big)
assert big.item() == 1e4
print("stored scale")

# cast_group: one launch for several tensors, each with its own scale (exact inputs, as above)
cast_kernel._runs_on = lambda device: True  # CPU tensors under the interpreter
for src, dtype in ((torch.float32, torch.float8_e4m3fn), (torch.bfloat16, torch.float8_e5m2)):
    xs = [torch.randint(0, 256, s, dtype=torch.uint8).view(dtype).float().nan_to_num(0).to(src)
          for s in [(70, 200), (0, 5), (3, 4097), (5000,)]]
    xs[0][0, :3] = torch.tensor([1e6, -1e6, float("inf")])
    scales = torch.tensor([1.0, 2.0, 1.0, 1.0])
    for limit in (1024, 3):  # 3: two launches
        cast_kernel._GROUP_MAX = limit
        out = cast_kernel.cast_group(xs, scales, dtype)
        for x, s, y in zip(xs, scales, out):
            assert y.shape == x.shape and y.dtype == dtype
            assert torch.equal(y.view(torch.uint8), saturated_cast(x, s, dtype).view(torch.uint8)), (src, x.shape)
print("group")
print("ok")

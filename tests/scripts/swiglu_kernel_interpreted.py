"""Run fp8train.swiglu_kernel's Triton kernels under Triton's CPU interpreter against the torch
reference (used by tests/test_swiglu.py when Triton is installed). The interpreter's fp32 -> fp8
conversion is not the GPU's (see cast_kernel_interpreted.py), so: >= 90% of the bytes match, the
layouts hold the same bytes, the recomputed g is the forward's, and the amaxes are right; the GPU
tests compare every element. Prints ``ok`` at the end."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch  # noqa: E402

from fp8train import swiglu_kernel as K  # noqa: E402
from fp8train.scaling import saturated_cast  # noqa: E402

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2


def same(a, b):
    return (a.view(torch.uint8) == b.view(torch.uint8)).float().mean().item()


torch.manual_seed(0)
for rows, cols in [(100, 300), (64, 64), (3, 130)]:
    h1, h3, dg = ((torch.randn(rows, cols) * 2).bfloat16() for _ in range(3))
    sg, s1, s3 = torch.tensor(30.0), torch.tensor(20.0), torch.tensor(10.0)
    y, p = K._swiglu_fwd_op(h1, h3, sg, E4, True, True)
    g = K.swiglu_reference(h1, h3)
    assert same(y, saturated_cast(g, sg, E4)) > 0.9
    assert p.amax().item() == g.abs().max().item()
    da, da_t, db, db_t, gt, pa, pb = K._swiglu_bwd_op(dg, h1, h3, sg, s1, s3, E4, E5, True, True, True, True)
    rda, rdb = K.swiglu_backward_reference(dg, h1, h3)
    assert same(da, saturated_cast(rda, s1, E5)) > 0.9 and same(db, saturated_cast(rdb, s3, E5)) > 0.9
    assert same(da_t.t(), da) == 1 and same(db_t.t(), db) == 1 and same(gt.t(), y) == 1
    torch.testing.assert_close(pa.amax(), rda.abs().max(), rtol=1e-6, atol=0)
    torch.testing.assert_close(pb.amax(), rdb.abs().max(), rtol=1e-6, atol=0)
    # eager code launches the kernels directly (not through the ops): the same bytes
    assert all(torch.equal(u, v) for u, v in zip(K._fwd(h1, h3, sg, E4, True, True), (y, p)))
    eager = K._bwd(dg, h1, h3, sg, s1, s3, E4, E5, True, True, True, True)
    assert all(torch.equal(u, v) for u, v in zip(eager, (da, da_t, db, db_t, gt, pa, pb)))
    h1[0, 0] = float("nan")
    _, p = K._swiglu_fwd_op(h1, h3, sg, E4, False, True)
    assert p.amax().item() == float("inf")
    print(rows, cols, "fine")
print("ok")

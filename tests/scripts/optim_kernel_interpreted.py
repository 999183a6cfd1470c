"""Run AdamWFp8's Triton kernel under Triton's CPU interpreter against the torch path (used by
tests/test_optim.py when Triton is installed). The interpreter (Triton 3.9) truncates fp32 -> bf16
and mis-rounds fp32 -> e4m3 where the mantissa carries into the next binade, so stored moments are
not compared; the parameter update (computed from the fp32 moments) and the block scales are.
Prints one line per case: ``shape block v8 max|dp| max|dscale|``."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch  # noqa: E402

from fp8train.blockwise import E4M3, quantize_blockwise_  # noqa: E402
from fp8train.optim import _update_rows  # noqa: E402
from fp8train.optim_kernel import adamw_fp8_update_  # noqa: E402

torch.manual_seed(0)
# whole blocks (the flat path), a partial block, a non-power-of-two block, blocks wider than the row
for rows, cols, block, v8 in [(8, 256, 128, False), (5, 300, 128, True), (6, 100, 48, False), (4, 100, 512, True)]:
    nb = -(-cols // block)
    p, g = torch.randn(rows, cols), torch.randn(rows, cols)
    m8, ms = torch.empty(rows, cols, dtype=E4M3), torch.empty(rows, nb)
    quantize_blockwise_(torch.randn(rows, cols) * 0.1, m8, ms, block)
    if v8:
        vs, vsc = torch.empty(rows, cols, dtype=E4M3), torch.empty(rows, nb)
        quantize_blockwise_(torch.rand(rows, cols) * 0.1, vs, vsc, block)
    else:
        vs, vsc = (torch.rand(rows, cols) * 0.01).bfloat16(), None
    sc = dict(decay=0.999, one_minus_beta1=0.1, beta2=0.95, one_minus_beta2=0.05, step_size=1e-2, bc2_sqrt=0.3, eps=1e-8)
    ref = [t.clone() if t is not None else None for t in (p, g, m8, ms, vs, vsc)]
    out = [t.clone() if t is not None else None for t in (p, g, m8, ms, vs, vsc)]
    _update_rows(*ref, *[torch.tensor(x) for x in sc.values()], block=block, stochastic=False)
    adamw_fp8_update_(*out, **sc, block=block, stochastic=False)
    dp = (ref[0] - out[0]).abs().max().item()
    ds = max((ref[i] - out[i]).abs().max().item() for i in (3, 5) if ref[i] is not None)
    stoch = [t.clone() if t is not None else None for t in (p, g, m8, ms, vs, vsc)]
    adamw_fp8_update_(*stoch, **sc, block=block, stochastic=True)  # runs (64-bit seeds, both streams)
    assert torch.isfinite(stoch[0]).all()
    print(f"{rows}x{cols} {block} {v8} {dp:.3e} {ds:.3e}")

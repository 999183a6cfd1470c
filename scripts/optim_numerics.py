"""How the storage formats of AdamWFp8 behave against fp32 AdamW, on CPU (~30 s). The numbers
behind the defaults in ``fp8train/optim.py`` and ``docs/OPTIMIZER.md``.

    python scripts/optim_numerics.py

1. Second-moment storage alone: ``v`` follows gradients whose scale falls 100x over 3000 steps;
   the table gives ``sqrt(v_stored / v_fp32)`` at the end (the factor by which the update is too
   small), mean and spread over elements, per format, rounding and ``beta2``.
2. The whole optimizer: a 3-layer MLP regression trained 200 steps with ``torch.optim.AdamW``
   and with each AdamWFp8 variant from the same start; final loss and parameter drift
   ``||p - p_adamw|| / ||p_adamw - p_0||``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fp8train.blockwise import E4M3, dequantize_blockwise, quantize_blockwise_, round_to_bf16
from fp8train.optim import AdamWFp8


def second_moment_tracking(steps: int = 3000, block: int = 128) -> None:
    print(f"1. v storage, gradients shrinking 100x over {steps} steps: sqrt(v_stored / v_fp32) at the end")
    print(f"{'beta2':>6} {'format':>6} {'rounding':>10} {'mean':>7} {'std':>7}")
    for beta2 in (0.95, 0.999):
        for fmt in ("bf16", "fp8"):
            for stochastic in (False, True):
                torch.manual_seed(0)
                rows, cols = 64, 256
                v_ref = torch.zeros(rows, cols)
                store = torch.zeros(rows, cols, dtype=torch.bfloat16 if fmt == "bf16" else E4M3)
                scale = torch.zeros(rows, cols // block)
                for t in range(steps):
                    g = torch.randn(rows, cols) * 10 ** (-2 * t / steps) * (1 + torch.rand(rows, 1))
                    v_ref.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    v = store.float() if fmt == "bf16" else dequantize_blockwise(store, scale, block).square()
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    if fmt == "bf16":
                        store.copy_(round_to_bf16(v, stochastic))
                    else:
                        quantize_blockwise_(v.sqrt(), store, scale, block, stochastic)
                v = store.float() if fmt == "bf16" else dequantize_blockwise(store, scale, block).square()
                ratio = (v / v_ref).sqrt()
                rounding = "stochastic" if stochastic else "nearest"
                print(f"{beta2:6} {fmt:>6} {rounding:>10} {ratio.mean():7.3f} {ratio.std():7.3f}")


def mlp_parity(steps: int = 200) -> None:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(4096, 64, generator=g)
    Y = torch.tanh(X @ (torch.randn(64, 16, generator=g) / 8)) * 2 + 0.1 * torch.randn(4096, 16, generator=g)

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 256), nn.GELU(),
                             nn.Linear(256, 16))

    def train(make_opt) -> tuple[torch.Tensor, float]:
        torch.manual_seed(123)
        model, data = make(), torch.Generator().manual_seed(5)
        opt = make_opt(model.parameters())
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, 4096, (128,), generator=data)
            loss = F.mse_loss(model(X[idx]), Y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return torch.cat([p.detach().flatten() for p in model.parameters()]), sum(losses[-20:]) / 20

    p0 = torch.cat([p.detach().flatten() for p in make().parameters()])
    print(f"\n2. MLP regression, {steps} steps, lr 3e-3, wd 0.1: loss = mean of the last 20 steps")
    print(f"{'betas':>12} {'second moment':>14} {'rounding':>10} {'loss vs AdamW':>14} {'drift':>7}")
    for betas in ((0.9, 0.95), (0.9, 0.999)):
        kw = dict(lr=3e-3, betas=betas, weight_decay=0.1)
        ref, ref_loss = train(lambda p: torch.optim.AdamW(p, **kw))
        for fmt in ("bf16", "fp8"):
            for stochastic in (False, True):
                got, loss = train(lambda p: AdamWFp8(p, second_moment=fmt, stochastic_rounding=stochastic, **kw))
                drift = ((got - ref).norm() / (ref - p0).norm()).item()
                rounding = "stochastic" if stochastic else "nearest"
                print(f"{str(betas):>12} {fmt:>14} {rounding:>10} {loss / ref_loss - 1:+14.2%} {drift:7.3f}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    second_moment_tracking()
    mlp_parity()

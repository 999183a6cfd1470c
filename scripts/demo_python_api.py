"""fp8train through the plain Python API: convert, train, sync, report.

    python scripts/demo_python_api.py [--recipe delayed] [--steps 200]

Trains a small MLP regression in fp8 and in high precision from the same init and prints both
loss curves and the conversion report. Runs on CPU (real ``torch._scaled_mm``) or CUDA.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn

import fp8train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="delayed", choices=fp8train.recipe_names())
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    hp = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 10)).to(device)
    f8 = fp8train.convert_to_float8_training(copy.deepcopy(hp), config=args.recipe, auto_filter=False)
    print(fp8train.conversion_report(f8).table())
    teacher = nn.Linear(256, 10).to(device)
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (hp, f8)}
    for step in range(args.steps):
        x = torch.randn(512, 256, device=device)
        y = teacher(x).detach()
        losses = []
        for m, opt in opts.items():
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(m(x).float(), y)
            loss.backward()
            fp8train.sync_float8_amax_and_scale_history(m)  # no-op for models without delayed layers
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  bf16 loss {losses[0]:.4f}  fp8[{args.recipe}] loss {losses[1]:.4f}")


if __name__ == "__main__":
    main()

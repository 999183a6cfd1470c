"""Compiled vs eager vs an fp32 reference, per recipe: is a compile gap a bug or two equal noises? (diagnostic)

Trains nothing: 3 forward+backward passes of Linear-GELU-Linear (the test_gpu compile test's model),
grads accumulated, then SQNR (dB) of outputs and weight grads for eager-fp8, compiled-fp8 (inductor)
and compiled-fp8 (aot_eager) against the unconverted fp32 model, and against each other.
"""
import copy

import torch
import torch.nn as nn

import fp8train


def sqnr(a, b):
    a, b = a.float(), b.float()
    return (20 * torch.log10(b.norm() / (a - b).norm())).item()


def run(model, x, compiled_backend=None):
    m = torch.compile(model, fullgraph=True, backend=compiled_backend) if compiled_backend else model
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            m(x).float().pow(2).mean().backward()
        if isinstance(model[0], fp8train.Float8Linear):
            fp8train.sync_float8_amax_and_scale_history(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
    return y, model[0].weight.grad.clone(), model[2].weight.grad.clone()


def main():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512)).cuda()
    x = torch.randn(1024, 512, device="cuda")
    ref = run(copy.deepcopy(base), x)
    print(f"{'recipe':20} {'what':10} {'eager/ref':>10} {'inductor/ref':>13} {'aot_eager/ref':>14} {'ind/eager':>10} {'aot/eager':>10}")
    for recipe in fp8train.recipe_names():
        torch._dynamo.reset()
        m = fp8train.convert_to_float8_training(copy.deepcopy(base), config=recipe, auto_filter=False)
        eager = run(copy.deepcopy(m), x)
        ind = run(copy.deepcopy(m), x, "inductor")
        torch._dynamo.reset()
        aot = run(copy.deepcopy(m), x, "aot_eager")
        for i, what in enumerate(("output", "w0.grad", "w2.grad")):
            print(f"{recipe:20} {what:10} {sqnr(eager[i], ref[i]):10.1f} {sqnr(ind[i], ref[i]):13.1f} "
                  f"{sqnr(aot[i], ref[i]):14.1f} {sqnr(ind[i], eager[i]):10.1f} {sqnr(aot[i], eager[i]):10.1f}")


if __name__ == "__main__":
    main()

"""Which part of Float8Linear.forward breaks weight grads under dynamo on some torch versions?"""
import copy, contextlib
import torch, torch.nn as nn
import fp8train
from fp8train import linear as L

def run(tag, forward):
    torch._dynamo.reset(); torch.manual_seed(0)
    m = fp8train.convert_to_float8_training(nn.Linear(64, 32), config="tensorwise")
    e = copy.deepcopy(m)
    m.forward = forward.__get__(m)
    x = torch.randn(16, 64)
    try:
        torch.compile(m, fullgraph=True, backend="eager")(x).sum().backward()
        e(x).sum().backward()
        print(f"{tag:40s} compiled={m.weight.grad.abs().sum():.2f} eager={e.weight.grad.abs().sum():.2f}")
    except Exception as ex:
        print(tag, "ERROR", type(ex).__name__, str(ex)[:300])

def make(autocast_ctx: bool, const_flags: bool, reshape: bool):
    def fwd(self, input):
        plan = L._Plan(self.config, self.linear_mm_config, input.dtype, False,
                       True if const_flags else input.requires_grad,
                       True if const_flags else self.weight.requires_grad)
        x = input.reshape(-1, self.in_features) if reshape else input
        ctx = torch.autocast("cpu", enabled=False) if autocast_ctx else contextlib.nullcontext()
        with ctx:
            out = L._Float8LinearFn.apply(x, self.weight, plan)
        return out + self.bias
    return fwd

for a in (True, False):
    for c in (True, False):
        for r in (True, False):
            run(f"autocast_ctx={a} const_flags={c} reshape={r}", make(a, c, r))
print("torch", torch.__version__)

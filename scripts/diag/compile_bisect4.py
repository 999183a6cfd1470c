"""Ops on a grad-requiring input inside autograd.Function.forward under dynamo (diagnostic)."""
import copy
import torch, torch.nn as nn
import fp8train
from fp8train import linear as L

class E1(torch.autograd.Function):  # arithmetic on w inside forward
    @staticmethod
    def forward(ctx, x, w):
        s = 448.0 / w.abs().amax(); w8 = (w * s).to(torch.float8_e4m3fn)
        ctx.save_for_backward(x, w); return x @ (w8.float() / s).t()
    @staticmethod
    def backward(ctx, go):
        x, w = ctx.saved_tensors; return go @ w, go.t() @ x

class E2(torch.autograd.Function):  # same, detached first
    @staticmethod
    def forward(ctx, x, w):
        x, w = x.detach(), w.detach()
        s = 448.0 / w.abs().amax(); w8 = (w * s).to(torch.float8_e4m3fn)
        ctx.save_for_backward(x, w); return x @ (w8.float() / s).t()
    @staticmethod
    def backward(ctx, go):
        x, w = ctx.saved_tensors; return go @ w, go.t() @ x

class E3(torch.autograd.Function):  # return None for x
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w); return x @ w.t()
    @staticmethod
    def backward(ctx, go):
        x, w = ctx.saved_tensors; return None, go.t() @ x

for name, F in (("E1", E1), ("E2", E2), ("E3", E3)):
    torch._dynamo.reset()
    w = nn.Parameter(torch.randn(16, 16)); x = torch.ones(8, 16)
    torch.compile(lambda x: F.apply(x, w), fullgraph=True, backend="eager")(x).sum().backward()
    print(name, "grad_w sum", None if w.grad is None else float(w.grad.abs().sum()), "(want 2048)")

orig = L._Float8LinearFn.forward
def fwd_detached(ctx, x, weight, plan, *delayed):
    return orig(ctx, x.detach(), weight.detach(), plan, *delayed)
for tag, patch in (("F8 as is", None), ("F8 detached", fwd_detached)):
    L._Float8LinearFn.forward = staticmethod(patch or orig)
    torch._dynamo.reset(); torch.manual_seed(0)
    m = fp8train.convert_to_float8_training(nn.Linear(64, 32), config="tensorwise"); e = copy.deepcopy(m)
    x = torch.randn(16, 64)
    torch.compile(m, fullgraph=True, backend="eager")(x).sum().backward(); e(x).sum().backward()
    print(tag, f"compiled={m.weight.grad.abs().sum():.2f} eager={e.weight.grad.abs().sum():.2f}")
print(torch.__version__)

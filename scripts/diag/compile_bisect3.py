"""Tensor-subclass use inside autograd.Function under dynamo (diagnostic)."""
import torch, torch.nn as nn
from fp8train.tensor import Float8Tensor

def f8(t):
    return Float8Tensor(t.to(torch.float8_e4m3fn), torch.tensor(1.0), t.dtype)

class D1(torch.autograd.Function):  # subclass built in forward, plain tensors saved
    @staticmethod
    def forward(ctx, x, w):
        a = f8(x); ctx.save_for_backward(x, w); return a._data.float() @ w.t()
    @staticmethod
    def backward(ctx, go):
        x, w = ctx.saved_tensors; return go @ w, go.t() @ x

class D2(torch.autograd.Function):  # subclass saved for backward
    @staticmethod
    def forward(ctx, x, w):
        a = f8(x); ctx.save_for_backward(a, w); return x @ w.t()
    @staticmethod
    def backward(ctx, go):
        a, w = ctx.saved_tensors; return go @ w, go.t() @ a._data.float()

class D3(torch.autograd.Function):  # subclass built in backward
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w); return x @ w.t()
    @staticmethod
    def backward(ctx, go):
        x, w = ctx.saved_tensors; g = f8(go); return go @ w, g._data.float().t() @ x

class D4(torch.autograd.Function):  # ctx attribute holding dtypes
    @staticmethod
    def forward(ctx, x, w):
        ctx.dtypes = (x.dtype, w.dtype); ctx.save_for_backward(x, w); return x @ w.t()
    @staticmethod
    def backward(ctx, go):
        x, w = ctx.saved_tensors; return (go @ w).to(ctx.dtypes[0]), (go.t() @ x).to(ctx.dtypes[1])

for name, F in (("D1", D1), ("D2", D2), ("D3", D3), ("D4", D4)):
    torch._dynamo.reset()
    w = nn.Parameter(torch.randn(16, 16)); x = torch.ones(8, 16)
    try:
        torch.compile(lambda x: F.apply(x, w), fullgraph=True, backend="eager")(x).sum().backward()
        print(name, "grad_w sum", None if w.grad is None else float(w.grad.abs().sum()), "(want 128)")
    except Exception as e:
        print(name, "ERROR", type(e).__name__, str(e)[:300])
print(torch.__version__)

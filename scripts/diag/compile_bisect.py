"""Bisect torch.compile + autograd.Function features used by Float8Linear (diagnostic)."""
import dataclasses, copy
import torch, torch.nn as nn
import fp8train

@dataclasses.dataclass(frozen=True)
class P:
    need_dw: bool
    dtype: torch.dtype

class A(torch.autograd.Function):  # dataclass arg stored on ctx
    @staticmethod
    def forward(ctx, x, w, plan):
        ctx.plan = plan; ctx.save_for_backward(x, w); return x @ w.t()
    @staticmethod
    def backward(ctx, go):
        x, w = ctx.saved_tensors
        gw = go.t() @ x if ctx.plan.need_dw else None
        return go @ w, gw, None

class B(torch.autograd.Function):  # varargs after plan
    @staticmethod
    def forward(ctx, x, w, plan, *rest):
        ctx.plan = plan; ctx.n = len(rest); ctx.save_for_backward(x, w); return x @ w.t()
    @staticmethod
    def backward(ctx, go):
        x, w = ctx.saved_tensors
        return (go @ w, go.t() @ x, None) + (None,) * ctx.n

class C(torch.autograd.Function):  # saved None
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, None); return x @ w.t()
    @staticmethod
    def backward(ctx, go):
        x, _ = ctx.saved_tensors
        return None, go.t() @ x

def check(name, f, backend):
    torch._dynamo.reset()
    w = nn.Parameter(torch.randn(16, 16)); x = torch.randn(8, 16)
    try:
        torch.compile(lambda x: f(x, w), fullgraph=True, backend=backend)(x).sum().backward()
        ok = w.grad is not None and torch.allclose(w.grad, (torch.ones(8, 16).t() @ x), atol=1e-4)
        print(f"{name:10s} {backend:10s} grad_w ok={ok} {'' if ok else w.grad if w.grad is None else w.grad.abs().sum()}")
    except Exception as e:
        print(f"{name:10s} {backend:10s} ERROR {type(e).__name__}: {str(e)[:200]}")

for be in ("eager", "aot_eager", "inductor"):
    check("A", lambda x, w: A.apply(x, w, P(True, torch.float32)), be)
    check("B", lambda x, w: B.apply(x, w, P(True, torch.float32)), be)
    check("C", lambda x, w: C.apply(x, w), be)
    for recipe in ("tensorwise", "rowwise"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = fp8train.convert_to_float8_training(nn.Linear(64, 32), config=recipe)
        e = copy.deepcopy(m)
        x = torch.randn(16, 64)
        torch.compile(m, fullgraph=True, backend=be)(x).sum().backward()
        e(x).sum().backward()
        print(f"F8{recipe:8s} {be:10s} grad_w sum compiled={m.weight.grad.abs().sum():.4f} eager={e.weight.grad.abs().sum():.4f} bias={m.bias.grad.abs().sum():.1f}/{e.bias.grad.abs().sum():.1f}")

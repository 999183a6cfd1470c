"""Probe torch.compile behaviours fp8train relies on (run on each torch version you support)."""
import torch, torch.nn as nn

class Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, amax_go):
        ctx.nig = tuple(ctx.needs_input_grad)
        ctx.save_for_backward(x, w, amax_go)
        return x @ w.t()
    @staticmethod
    def backward(ctx, go):
        x, w, amax_go = ctx.saved_tensors
        amax_go.copy_(torch.maximum(amax_go, go.abs().amax()))
        return go @ w, go.t() @ x, None

class M(nn.Module):
    def __init__(s):
        super().__init__(); s.w = nn.Parameter(torch.randn(16, 16)); s.register_buffer("ag", torch.zeros(()))
    def forward(s, x): return Fn.apply(x, s.w, s.ag)

for backend in ("eager", "aot_eager", "inductor"):
    torch._dynamo.reset()
    m = M(); mc = torch.compile(m, fullgraph=True, backend=backend)
    x = torch.randn(8, 16)
    mc(x).mul(2).sum().backward()
    ref = x.t() @ torch.full((8, 16), 2.0)
    print(backend, "grad_w ok:", torch.allclose(m.w.grad, ref.t(), atol=1e-4), "amax_go:", m.ag.item(), "(want 2.0)")

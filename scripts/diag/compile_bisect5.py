"""Split Float8Linear's autograd function: which half misbehaves under dynamo (diagnostic)."""
import copy
import torch, torch.nn as nn
import fp8train
from fp8train import linear as L
REAL = L._Float8LinearFn

class G1(torch.autograd.Function):  # real forward, trivial backward (hp x saved separately)
    @staticmethod
    def forward(ctx, x, weight, plan, *delayed):
        out = REAL.forward(ctx, x, weight, plan, *delayed)
        ctx.hp = (x, weight)
        return out
    @staticmethod
    def backward(ctx, go):
        x, w = ctx.hp
        return go @ w, go.t() @ x, None

class G2(torch.autograd.Function):  # trivial forward, real backward
    @staticmethod
    def forward(ctx, x, weight, plan, *delayed):
        cfg = plan.config
        x8 = L._cast(x, cfg.cast_config_input, L.INPUT, -1, plan)
        w8 = L._cast(weight, cfg.cast_config_weight, L.WEIGHT, -1, plan)
        ctx.x_fp8, ctx.w_fp8 = True, True
        ctx.save_for_backward(x8.data, x8.scale, w8.data, w8.scale, None, None)
        ctx.plan, ctx.dtypes, ctx.n_delayed = plan, (x.dtype, weight.dtype), 0
        return x @ weight.t()
    backward = staticmethod(REAL.backward)

class G3(torch.autograd.Function):  # real forward, real backward, but grads forced via plain ops at the end
    forward = staticmethod(REAL.forward)
    @staticmethod
    def backward(ctx, go):
        gx, gw, *rest = REAL.backward(ctx, go)
        return (gx, gw * 1.0, *rest)

for name, F in (("orig", L._Float8LinearFn), ("G1 real fwd", G1), ("G2 real bwd", G2), ("G3", G3)):
    torch._dynamo.reset(); torch.manual_seed(0)
    m = fp8train.convert_to_float8_training(nn.Linear(64, 32), config="tensorwise"); e = copy.deepcopy(m)
    x = torch.randn(16, 64)
    saved = L._Float8LinearFn
    L._Float8LinearFn = F
    try:
        torch.compile(m, fullgraph=True, backend="eager")(x).sum().backward()
        print(f"{name:12s} compiled={m.weight.grad.abs().sum():.2f}", end=" ")
    except Exception as ex:
        print(name, "ERROR", type(ex).__name__, str(ex)[:400], end=" ")
    finally:
        L._Float8LinearFn = saved
    e(x).sum().backward(); print(f"eager={e.weight.grad.abs().sum():.2f}")
print(torch.__version__)

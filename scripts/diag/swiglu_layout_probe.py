"""Which transposed bytes of fp8train.swiglu_kernel's backward are wrong (diagnostic)."""
import torch
from fp8train import swiglu_kernel as K
E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
u = lambda t: t.view(torch.uint8)
torch.manual_seed(0)
for shape in ((4096, 1024), (128, 128), (64, 128), (128, 256), (1000, 300), (1024, 1000)):
    h1, h3, dg = ((torch.randn(shape, device="cuda") * 3).bfloat16() for _ in range(3))
    one = torch.tensor(1.0, device="cuda")
    for tm in (0, 1):
        K._TMODE = tm
        for rows_, amax in ((True, True), (False, False), (True, False)):
            a, at, b, bt, gt, _, _ = K.swiglu_backward_cast(dg, h1, h3, scale_g=one, scale_dh1=one, scale_dh3=one,
                                                            g_dtype=E4, grad_dtype=E5, rows=rows_, amax=amax)
            ref_a, _, _, _ = K.swiglu_backward_reference(dg, h1, h3)[0], 0, 0, 0
            want = u(ref_a.clamp(-57344, 57344).to(E5).t().contiguous())
            bad = u(at) != want
            idx = bad.nonzero()
            print(shape, "tmode", tm, "rows", rows_, "amax", amax, "bad frac", round(bad.float().mean().item(), 4),
                  "bad rows (c) sample", sorted(set(idx[:, 0].tolist()))[:12], "bad cols (r) sample",
                  sorted(set(idx[:, 1].tolist()))[:12], "zeros in at", (u(at) == 0).float().mean().item(), flush=True)

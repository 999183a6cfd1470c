"""Rowwise under inductor: which inductor setting or fp8train code path makes the weight-grad gap? (diagnostic)

Same model and reference as compile_vs_reference.py. Runs rowwise eager once, then inductor under
several variants, printing SQNR (dB) against the fp32 reference and against eager:

    python scripts/diag/compile_gap.py [--recipe rowwise] [--variants default emulate_casts ...]
"""
import argparse
import contextlib
import copy
import dataclasses

import torch
import torch.nn as nn

import fp8train
from fp8train import linear as L
from fp8train.ops import Fp8Operand
from fp8train.scaling import amax_to_scale, saturated_cast, tensor_amax


def sqnr(a, b):
    a, b = a.float(), b.float()
    return (20 * torch.log10(b.norm() / (a - b).norm())).item()


def run(model, x, backend=None):
    m = torch.compile(model, fullgraph=True, backend=backend) if backend else model
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            m(x).float().pow(2).mean().backward()
        if isinstance(model[0], fp8train.Float8Linear):
            fp8train.sync_float8_amax_and_scale_history(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
    return y, model[0].weight.grad.clone(), model[2].weight.grad.clone()


_ORIG_CAST = L._cast


def _cast_rowmajor(t, cfg, role, reduce_dim, plan, scale=None, amax=None):
    """fp8train's cast before the transposed-cast change: always row-major."""
    if cfg.enabled and cfg.axiswise and reduce_dim % t.dim() == 0 and t.dim() == 2:
        s = amax_to_scale(tensor_amax(t, 0), cfg.target_dtype, plan.config.round_scales_to_power_of_2)
        return Fp8Operand(saturated_cast(t, s, cfg.target_dtype), s)
    return _ORIG_CAST(t, cfg, role, reduce_dim, plan, scale, amax)


@contextlib.contextmanager
def variant(name):
    ind = torch._inductor.config
    saved = {}

    def setcfg(mod, key, value):
        saved[(mod, key)] = getattr(mod, key)
        setattr(mod, key, value)

    if name == "emulate_casts":
        setcfg(ind, "emulate_precision_casts", True)
    elif name == "no_pattern_matcher":
        setcfg(ind, "pattern_matcher", False)
    elif name == "no_split_reductions":
        setcfg(ind, "split_reductions", False)
    elif name == "no_upcast_fp32":
        setcfg(ind.triton, "codegen_upcast_to_fp32", False)
    elif name == "rowmajor_cast":
        setcfg(L, "_cast", _cast_rowmajor)
    elif name == "no_fusion":
        setcfg(ind, "max_fusion_size", 1)
    elif name == "no_reorder":
        setcfg(ind, "reorder_for_locality", False)
    try:
        yield
    finally:
        for (mod, key), value in saved.items():
            setattr(mod, key, value)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="rowwise")
    p.add_argument("--pow2", choices=["recipe", "off"], default="recipe")
    p.add_argument("--variants", nargs="+", default=[
        "default", "emulate_casts", "no_pattern_matcher", "no_split_reductions", "no_upcast_fp32",
        "rowmajor_cast", "no_fusion", "no_reorder"])
    a = p.parse_args()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512)).cuda()
    x = torch.randn(1024, 512, device="cuda")
    ref = run(copy.deepcopy(base), x)
    cfg = fp8train.Float8LinearConfig.from_recipe_name(a.recipe)
    if a.pow2 == "off":
        cfg = dataclasses.replace(cfg, round_scales_to_power_of_2=False)
    m = fp8train.convert_to_float8_training(copy.deepcopy(base), config=cfg, auto_filter=False)
    eager = run(copy.deepcopy(m), x)
    print(f"recipe={a.recipe} pow2={a.pow2}")
    print(f"{'variant':22} {'out/ref':>8} {'w0/ref':>8} {'w2/ref':>8} {'out/eag':>8} {'w0/eag':>8} {'w2/eag':>8}")
    print(f"{'eager':22} " + " ".join(f"{sqnr(eager[i], ref[i]):8.1f}" for i in range(3)))
    for v in a.variants:
        torch._dynamo.reset()
        try:
            with variant(v):
                got = run(copy.deepcopy(m), x, "inductor")
        except Exception as e:  # a variant the installed torch lacks
            print(f"{v:22} ERROR {type(e).__name__}: {str(e)[:120]}")
            continue
        print(f"{v:22} " + " ".join(f"{sqnr(got[i], ref[i]):8.1f}" for i in range(3)) + " "
              + " ".join(f"{sqnr(got[i], eager[i]):8.1f}" for i in range(3)), flush=True)


if __name__ == "__main__":
    main()

"""AdamWFp8 on CUDA (marked gpu: skipped without CUDA). Run on an H100/H200 with
``pytest -m gpu tests/test_optim_gpu.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fp8train.blockwise import dequantize_blockwise
from fp8train.optim import AdamWFp8

pytestmark = pytest.mark.gpu


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def test_cuda_compiled_update_matches_eager_and_cpu():
    _cuda()
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    shapes = [(2048, 2048), (512, 300), (3, 5, 256)]
    cpu = [nn.Parameter(torch.randn(s)) for s in shapes]
    eager = [nn.Parameter(p.detach().cuda()) for p in cpu]
    comp = [nn.Parameter(p.detach().cuda()) for p in cpu]
    kw = dict(lr=1e-2, weight_decay=0.1, stochastic_rounding=False)
    opts = [AdamWFp8(cpu, **kw), AdamWFp8(eager, **kw), AdamWFp8(comp, compile=True, **kw)]
    for t in range(5):
        for o in opts:
            o.param_groups[0]["lr"] = 1e-2 * (t + 1)  # a schedule: a new lr every step
        for a, b, c in zip(cpu, eager, comp):
            a.grad = torch.randn(a.shape)
            b.grad, c.grad = a.grad.cuda(), a.grad.cuda()
        for o in opts:
            o.step()
    # no recompile per learning rate (torch 2.11 recompiled on each one while lr was a Python float)
    assert counters["stats"]["unique_graphs"] <= len(shapes), dict(counters["stats"])
    for a, b, c in zip(cpu, eager, comp):
        # CUDA's fp32 arithmetic (FMA contraction, and inductor's fusion when compiled) differs from
        # the CPU's in the last bit, which moves a moment across an fp8 rounding boundary now and
        # then; that element's later updates then differ by up to ~lr/8 each (eager CUDA vs CPU
        # measured on an H200, 2026-11-29: max 0.0019)
        for name, x in (("eager", b), ("compiled", c)):
            d = (x.detach().cpu() - a.detach()).abs()
            frac = (d > 1e-5).float().mean().item()
            assert frac < 1e-3 and d.max() < 0.05, (name, d.max().item(), frac)
    w = comp[0]
    m = dequantize_blockwise(opts[2].state[w]["exp_avg"], opts[2].state[w]["exp_avg_scale"], 128)
    m_ref = dequantize_blockwise(opts[0].state[cpu[0]]["exp_avg"], opts[0].state[cpu[0]]["exp_avg_scale"], 128)
    # the same rounding-boundary flips: an element's moment may differ by an e4m3 step or two;
    # only a few may (the strict all-elements |m|/8 bound failed on an H200, 2026-11-29)
    off = (m.cpu() - m_ref).abs() > m_ref.abs() / 8 + 1e-12
    assert off.float().mean().item() < 1e-3, off.float().mean().item()
    assert ((m.cpu() - m_ref).abs() <= m_ref.abs() / 2 + m_ref.abs().max() / 64).all()


def test_cuda_step_memory_is_bounded():
    """The step's fp32 temporaries are made per row chunk: the peak during a step of a 67M-element
    matrix stays well below the 8 B/param an fp32 state would need."""
    _cuda()
    p = nn.Parameter(torch.randn(32768, 2048, device="cuda"))
    p.grad = torch.randn_like(p)
    opt = AdamWFp8([p], compile=False)
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert opt.state_bytes()["bytes_per_param"] == pytest.approx(3.03125)
    # row chunks of 2**24 elements (64 MiB in fp32), ~6 temporaries live: expected ~400 MiB (not
    # yet measured on a GPU); unchunked, the same temporaries of the 256 MiB matrix would take ~1.5 GiB
    assert extra < 640 * 2**20, extra / 2**20

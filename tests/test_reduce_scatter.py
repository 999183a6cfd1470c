"""Float8ReduceScatter on its own, in one process (a 1-rank gloo group): the per-element error of
the fp8 wire format, and the errors. The 2-rank FSDP2 run is in test_optim_fsdp2.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from fp8train.reduce_scatter import Float8ReduceScatter, enable_fp8_reduce_scatter, fp8_reduce_scatter_supported

pytestmark = pytest.mark.skipif(not fp8_reduce_scatter_supported(), reason="needs torch >= 2.9")


@pytest.fixture()
def group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_one_e4m3_rounding_per_element(group):
    torch.manual_seed(0)
    n, block = 1000, 256  # 3 whole blocks and a partial one
    x = torch.randn(n) * torch.logspace(-4, 1, n)  # 5 decades across the buffer
    out = torch.empty(n)
    Float8ReduceScatter(block)(output_tensor=out, input_tensor=x, group=group, op=dist.ReduceOp.SUM)
    # e4m3 round-to-nearest: half a unit in the last place is <= 2**-4 of the value for normal
    # values, and 2**-10 of the block's scale (amax / 448) in the subnormal range
    scale = torch.nn.functional.pad(x, (0, -n % block)).view(-1, block).abs().amax(1).repeat_interleave(block)[:n] / 448
    assert ((out - x).abs() <= x.abs() * 2**-4 + scale * 2**-10 + 1e-12).all()
    sqnr = 10 * torch.log10(x.pow(2).sum() / (out - x).pow(2).sum())
    assert sqnr > 29, sqnr  # measured 32.4 dB


def test_errors_name_what_to_change(group):
    with pytest.raises(ValueError, match=r"block_size=8.*>= 16"):
        Float8ReduceScatter(block_size=8)
    with pytest.raises(ValueError, match="SUM or AVG"):
        Float8ReduceScatter()(output_tensor=torch.empty(4), input_tensor=torch.ones(4), group=group,
                              op=dist.ReduceOp.PRODUCT)
    with pytest.raises(RuntimeError, match="after fully_shard"):
        enable_fp8_reduce_scatter(nn.Linear(4, 4))

"""Two GPU ranks (NCCL): the delayed sync's kernel path (gather -> MAX all-reduce -> apply) against its
torch path, every state buffer bit for bit on each rank, and both ranks left with identical state.
Each rank sees other amaxes (a NaN on rank 0 and an inf on rank 1 in different rows). Run with
``torchrun --nproc_per_node=2 tests/scripts/sync_kernel_nccl.py`` (tests/test_delayed.py, gpu marker).
Prints ``ok`` on rank 0."""

import copy
import os

import torch
import torch.distributed as dist
import torch.nn as nn

import fp8train
from fp8train import delayed

rank = int(os.environ["RANK"])
torch.cuda.set_device(rank)
dist.init_process_group("nccl")
try:
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(16, 16, bias=False, device="cuda") for _ in range(6)])
    base = fp8train.convert_to_float8_training(base, config="delayed", auto_filter=False)
    check = delayed._plain_cuda
    states = {}
    for path in ("kernel", "torch"):
        m = copy.deepcopy(base)
        delayed._plain_cuda = check if path == "kernel" else (lambda *args: False)
        for step in range(3):
            g = torch.Generator().manual_seed(100 * step + rank)
            for i, layer in enumerate(delayed._delayed_layers(m)):
                for r, role in enumerate(delayed.ROLES):
                    v = float(torch.rand((), generator=g) * 100)
                    if step == 1 and (i, r, rank) in ((0, 0, 0), (1, 2, 1)):
                        v = float("nan") if rank == 0 else float("inf")
                    if (i, r) == (2, 1) and rank == 1:
                        v = 0.0  # unseen on one rank: the other rank's amax counts
                    getattr(layer, f"fp8_amax_{role}").fill_(v)
            fp8train.sync_float8_amax_and_scale_history(m)
        assert all(g.kernel == (path == "kernel") for g in delayed._PLANS[m].groups), path
        states[path] = {k: v.clone() for k, v in m.state_dict().items() if "fp8_" in k}
    for k in states["kernel"]:
        a, b = states["kernel"][k], states["torch"][k]
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num()), (
            rank, k, a, b)
    flat = torch.cat([v.double().view(-1) for v in states["kernel"].values()])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "ranks differ"
    assert states["kernel"]["0.fp8_nonfinite_input"].item() == 1 and states["kernel"]["1.fp8_nonfinite_grad_output"].item() == 1
    if rank == 0:
        print("ok")
finally:
    dist.destroy_process_group()

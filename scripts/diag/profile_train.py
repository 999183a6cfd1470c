"""Where a compiled Llama training step spends its GPU time, per case, grouped by kind of kernel.

    python scripts/diag/profile_train.py [bench_train.py's arguments] [--out-dir DIR]

Runs ``bench_train.py``'s cases; after each case's timed steps it profiles 2 more steps and prints
per step: GPU time (CUDA events), host time (CPU time to enqueue a step onto an idle GPU), the sum
of kernel time, and kernel time by group: fp8 GEMMs (under ``aten::_scaled_mm``), bf16 GEMMs
(``aten::mm``/``addmm``/``bmm``), attention, Triton kernels (inductor's fused code and fp8train's own,
split into reductions and pointwise), the optimizer, copies/fills, other. The full kernel table goes
to ``DIR/prof_train_<case>.txt``.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_train  # noqa: E402

_OUT_DIR = "."
_CASES: list[str] = []


def _group(kernel: str, op: str) -> str:
    k, o = kernel.lower(), op.lower()
    if "scaled_mm" in o:
        return "gemm fp8"
    if o in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul") or "gemm" in k or "nvjet" in k:
        return "gemm bf16"
    if "flash" in k or "fmha" in k or "attention" in o:
        return "attention"
    if "adam" in k or "multi_tensor" in k or "adam" in o:
        return "optimizer"
    if k.startswith("triton_red") or k.startswith("triton_per"):
        return "triton reduction"
    if k.startswith("triton") or "cast_transpose" in k:
        return "triton pointwise"
    if "memcpy" in k or "memset" in k or "fill" in k or "copy" in k:
        return "copy/fill"
    return "other"


def _kernel_groups(prof: torch.profiler.profile, steps: int) -> tuple[dict[str, float], list[tuple[float, int, str, str]]]:
    """Kernel microseconds per step by group, and the per-kernel rows (us per step, count, name, op).

    A kernel is attributed to the outermost ``aten::`` op above the CPU event that launched it
    (``aten::_scaled_mm`` for the fp8 GEMMs); kernels the profiler links to no CPU event land in
    ``unattributed``."""
    events = prof.events()
    groups: dict[str, float] = defaultdict(float)
    rows: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    device_total = sum(e.time_range.elapsed_us() for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU or not e.kernels:
            continue
        op, node = "", e
        while node is not None:
            if node.name.startswith("aten::"):
                op = node.name
            node = node.cpu_parent
        for k in e.kernels:
            groups[_group(k.name, op)] += k.duration / steps
            row = rows[(k.name, op)]
            row[0] += k.duration / steps
            row[1] += 1
    groups["unattributed"] = max(0.0, device_total / steps - sum(groups.values()))
    table = sorted(((t, int(c) // steps, name, op) for (name, op), (t, c) in rows.items()), reverse=True)
    return dict(groups), table


def _profiled_time_steps(step, warmup: int, steps: int):
    case = _CASES.pop(0) if _CASES else "case"
    sync = torch.cuda.synchronize
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    sync()
    warmup_s = time.perf_counter() - t0
    host = []
    for _ in range(3):
        sync()
        t = time.perf_counter()
        loss = step()
        host.append(time.perf_counter() - t)
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        loss = step()
    end.record()
    sync()
    gpu = start.elapsed_time(end) / 1000 / steps
    n = 2
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            loss = step()
        sync()
    groups, table = _kernel_groups(prof, n)
    total = sum(groups.values())
    line = ", ".join(f"{g} {t / 1000:.1f}" for g, t in sorted(groups.items(), key=lambda kv: -kv[1]))
    print(f"[profile] {case}: gpu {gpu * 1000:.1f} ms/step, host {min(host) * 1000:.1f} ms/step, "
          f"kernels {total / 1000:.1f} ms/step: {line}", flush=True)
    with open(os.path.join(_OUT_DIR, f"prof_train_{case.replace('+', '_').replace('/', '_')}.txt"), "w") as f:
        f.write(f"{case}: gpu {gpu * 1000:.1f} ms/step, host {[round(h * 1000, 1) for h in host]} ms, kernels {total / 1000:.1f} ms/step\n")
        for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
            f.write(f"  {g:18s} {t / 1000:8.2f} ms\n")
        f.write("\nus/step  count  group  kernel  [aten op]\n")
        for t, c, name, op in table[:120]:
            f.write(f"{t:9.1f} x{c:<4} {_group(name, op):17s} {name[:110]}  [{op}]\n")
    return gpu, warmup_s, float(loss)


def main() -> None:
    global _OUT_DIR
    argv = sys.argv[1:]
    if "--out-dir" in argv:
        i = argv.index("--out-dir")
        _OUT_DIR = argv[i + 1]
        del argv[i:i + 2]
    recipes = ["tensorwise", "delayed", "rowwise"]
    if "--recipes" in argv:
        i, recipes = argv.index("--recipes") + 1, []
        while i < len(argv) and not argv[i].startswith("--"):
            recipes.append(argv[i])
            i += 1
    _CASES[:] = ["bf16"] + recipes
    bench_train.time_steps = _profiled_time_steps
    sys.argv = [sys.argv[0]] + argv
    bench_train.main()


if __name__ == "__main__":
    main()

"""Where an FSDP2 step's time goes, per case: host (Python) time per step, GPU time per step, and
the profiler's top CUDA kernels and CPU ops. Built to find why ``tensorwise+ag`` (fp8 all-gather)
measured slower than ``tensorwise`` on 2 x H200 (docs/PERF_NOTES.md).

    torchrun --nproc_per_node=2 scripts/diag/profile_fsdp.py --cases tensorwise tensorwise+ag [--out-dir DIR]

Takes bench_fsdp.py's arguments (model, batch, seq, cases, ...). Per case, rank 0 prints
``host ms/step`` (time for the CPU to enqueue one step, measured with a device sync before the
step only), ``gpu ms/step`` (CUDA events around unsynced steps) and writes the two profiler
tables to ``DIR/prof_<case>.txt``. ``+ag_clone`` runs ``+ag`` with every precomputed scale cloned
into its own tensor (tests whether scales that alias one vector cost anything under compile).
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_fsdp  # noqa: E402

import fp8train.fsdp as fsdp  # noqa: E402

_CASE = {"name": ""}
_OUT_DIR = "."


def _profiled_time_steps(step, warmup: int, steps: int):
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    sync()
    warmup_s = time.perf_counter() - t0
    host = []
    for _ in range(3):  # host time: CPU time to enqueue a step that starts on an idle GPU
        sync()
        t = time.perf_counter()
        loss = step()
        host.append(time.perf_counter() - t)
    sync()
    t = time.perf_counter()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    for _ in range(steps):
        loss = step()
    if cuda:
        end.record()
    sync()
    gpu = start.elapsed_time(end) / 1000 / steps if cuda else (time.perf_counter() - t) / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(2):
            loss = step()
        sync()
    if int(os.environ.get("RANK", 0)) == 0:
        ka = prof.key_averages()
        name = _CASE["name"].replace("+", "_")
        with open(os.path.join(_OUT_DIR, f"prof_{name}.txt"), "w") as f:
            f.write(f"{_CASE['name']}: host ms/step {[round(h * 1000, 1) for h in host]}, gpu ms/step {gpu * 1000:.1f} (2 profiled steps below)\n")
            f.write(ka.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30, max_name_column_width=70))
            f.write("\n")
            f.write(ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
        print(f"{_CASE['name']}: host ms/step {min(host) * 1000:.1f}, gpu ms/step {gpu * 1000:.1f}", flush=True)
    return gpu, warmup_s, float(loss)


def main() -> None:
    global _OUT_DIR
    argv = sys.argv[1:]
    if "--out-dir" in argv:
        i = argv.index("--out-dir")
        _OUT_DIR = argv[i + 1]
        del argv[i:i + 2]
    cases = []
    if "--cases" in argv:
        i = argv.index("--cases") + 1
        while i < len(argv) and not argv[i].startswith("--"):
            cases.append(argv[i])
            i += 1
    clone = any(c.endswith("+ag_clone") for c in cases)
    argv = [a.replace("+ag_clone", "+ag") if a.endswith("+ag_clone") else a for a in argv]
    bench_fsdp.time_steps = _profiled_time_steps
    original_run_case, original_precompute = bench_fsdp.run_case, fsdp.precompute_float8_dynamic_scale_for_fsdp
    order = iter(cases)

    def run_case(name, *a, **k):
        _CASE["name"] = next(order)
        cloning = _CASE["name"].endswith("+ag_clone")

        def precompute(model):
            n = original_precompute(model)
            if cloning:
                for m in model.modules():
                    w = getattr(getattr(m, "weight", None), "_local_tensor", None)
                    if getattr(w, "_precomputed_scale", None) is not None:
                        w._precomputed_scale = w._precomputed_scale.clone()
            return n

        bench_fsdp.fp8train.precompute_float8_dynamic_scale_for_fsdp = precompute
        try:
            return original_run_case(name, *a, **k)
        finally:
            bench_fsdp.fp8train.precompute_float8_dynamic_scale_for_fsdp = original_precompute

    bench_fsdp.run_case = run_case
    sys.argv = [sys.argv[0]] + argv
    del clone
    bench_fsdp.main()


if __name__ == "__main__":
    main()

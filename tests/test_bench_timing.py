"""The benchmarks' step timer (scripts/bench_train.py::time_steps): the median step, and a warning
when one step stalls (a warm-up too short). Checks the arithmetic, not any speed."""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
from bench_train import time_steps  # noqa: E402


def test_median_ignores_one_stalled_step_and_says_so(capsys):
    calls = []

    def step() -> torch.Tensor:
        calls.append(None)
        time.sleep(0.25 if len(calls) == 4 else 0.01)  # the 2nd timed step stalls
        return torch.tensor(float(len(calls)))

    sec, warmup_s, loss = time_steps(step, warmup=2, steps=5)
    assert len(calls) == 7 and loss == 7.0
    assert 0.009 < sec < 0.1  # a mean would be >= 0.058
    assert warmup_s >= 0.02
    assert "slowest step" in capsys.readouterr().out


def test_no_warning_for_even_steps(capsys):
    sec, _, _ = time_steps(lambda: (time.sleep(0.1), torch.zeros(()))[1], warmup=1, steps=3)
    assert sec >= 0.099
    assert "slowest step" not in capsys.readouterr().out


def test_run_metadata_names_the_code_by_a_source_hash():
    from bench_train import meta

    a, b = meta(model="x"), meta()
    assert a["model"] == "x" and {"device", "torch", "date", "commit"} <= a.keys()
    sha = a["fp8train_sha256"]
    assert len(sha) == 12 and int(sha, 16) >= 0 and sha == b["fp8train_sha256"]  # stable for the same sources


def test_after_warmup_runs_between_warm_up_and_timed_steps():
    order = []
    time_steps(lambda: (order.append("step"), torch.zeros(()))[1], warmup=2, steps=2,
               after_warmup=lambda: order.append("reset"))
    assert order == ["step", "step", "reset", "step", "step"]


def test_bench_fsdp_cases_parse_their_suffixes():
    import pytest

    from bench_fsdp import case_config

    assert case_config("bf16", cpu=True) is None
    assert case_config("delayed+ag+unfused", cpu=True).enable_fsdp_float8_all_gather
    assert not case_config("tensorwise+unfused", cpu=True).enable_fsdp_float8_all_gather
    with pytest.raises(ValueError, match=r"suffixes are '\+ag' .* and '\+unfused'"):
        case_config("tensorwise+fast", cpu=True)


def test_fsdp_table_speedups_are_against_bf16_or_say_none(capsys):
    """bench_fsdp's table: speedup = tok/s over the bf16 case's; "n/a" without a bf16 case."""
    from bench_fsdp import print_table

    row = {"tokens_per_s": 100.0, "mfu_bf16_peak": 0.5, "peak_mem_gib": 1.0, "fp8_layers": 3}
    print_table("t", {"bf16": row, "delayed": dict(row, tokens_per_s=130.0)})
    lines = capsys.readouterr().out.splitlines()
    assert "1.00x" in lines[-2] and "1.30x" in lines[-1]
    print_table("t", {"delayed": row})
    last = capsys.readouterr().out.splitlines()[-1]
    assert "n/a" in last and "nan" not in last

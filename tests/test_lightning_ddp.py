"""Float8Training under DDP: 2 CPU processes (gloo) launched with torch.distributed.run.

Lightning's ``strategy="ddp"`` re-launches ``sys.argv``, so the run happens in a script
(``tests/scripts/ddp_float8.py``), not inside the pytest process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_float8.py")


@pytest.mark.slow
def test_ddp_two_cpu_ranks_end_with_identical_scales_and_metrics(tmp_path):
    # a clean launch: no rendezvous variables inherited from whatever ran before in this process
    inherited = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in inherited and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == 2 and r0["backend"] == "gloo"
    # the ranks saw different data (rank 1's inputs are 2x) ...
    assert r1["input_amax"][0] > r0["input_amax"][0]
    # ... but amax was all-reduced with MAX: scales, histories and weights agree bit for bit
    fp8_keys = [k for k in r0["state"] if ".fp8_" in k]
    assert len(fp8_keys) == 3 * 4 * 3
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["state"]["net.0.fp8_amax_history_input"][0] == max(r0["input_amax"][3], r1["input_amax"][3])
    # the torchmetrics aggregate is the same on both ranks and is the max over ranks
    assert r0["computed"].keys() == r1["computed"].keys() == {1, 3}
    for step in (1, 3):
        a, b = r0["computed"][step], r1["computed"][step]
        assert a == b or all(str(a[k]) == str(b[k]) for k in a)  # NaN-aware equality
        assert a["amax"][0][0] == pytest.approx(max(r0["input_amax"][step], r1["input_amax"][step]))

"""FSDP2 (with and without fp8 all-gather), tensor parallelism, 2-D meshes and DCP on CPU ranks (gloo).

Each test launches ``tests/scripts/distributed_fp8.py`` with torch.distributed.run and reads what
every rank saved. References are the same model unsharded in one process on the whole batch.

Measured on torch 2.13 CPU, 4 AdamW steps at lr 1e-2 (tolerances below leave ~2x headroom):

* FSDP2 vs unsharded: losses within 0.55% (relative); first-step gradients of every parameter as
  close to the fp32 model's as the unsharded fp8 model's, within 1.2 dB of SQNR. The gap is fp8
  rounding: with dynamic scaling each rank scales its own half of the batch (delayed: only before
  the first sync).
* FSDP2 with vs without fp8 all-gather: bit-identical losses, gradients, weights and fp8 state (the
  scale of the whole weight is the same whether computed before or after the all-gather), with the
  fused precompute, without it, with a stale one, and with compiled blocks.
* tensor parallel (plain, sequence parallel, PyTorch's styles) vs single process: losses within
  0.42%, gradients within 2.24 dB; replicated parameters identical on every rank. (A wrongly
  reduced gradient costs 9-15 dB while the losses still agree within 0.5%: the loss alone is not
  a test.)
* 2-D (2 data parallel x 2 tensor parallel): losses within 0.30%, gradients within 1.34 dB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from _helpers import sqnr

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "distributed_fp8.py")
FSDP_TOLERANCE = 0.01  # measured 0.0055
TP_TOLERANCE = 0.01  # measured 0.0042 (1-D), 0.0030 (2-D)
GRAD_SQNR_GAP_DB = 4.0  # measured <= 2.24 dB; a missing gradient reduction: 9-15 dB


def _launch(scenario: str, out_dir, nproc: int = 2) -> list[dict]:
    inherited = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in inherited and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", SCRIPT,
           scenario, str(out_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return [torch.load(out_dir / f"{scenario}_rank{r}.pt", weights_only=False) for r in range(nproc)]


def _rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _grad_sqnr_gaps(run: dict, hp_grads: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter: SQNR (dB) of the single-process fp8 gradient minus the parallel run's, both
    against the fp32 model's first-step gradient."""
    assert run["grads"].keys() == hp_grads.keys()
    return {n: sqnr(run["reference_grads"][n], hp_grads[n]) - sqnr(g, hp_grads[n]) for n, g in run["grads"].items()}


@pytest.mark.slow
def test_fsdp2_fp8_all_gather_is_bit_identical_to_hp_all_gather_and_matches_unsharded(tmp_path):
    ranks = _launch("fsdp", tmp_path)
    hp_grads = ranks[0].pop("hp_grads")
    for recipe, runs in ranks[0].items():
        off = runs["off"]
        gaps = _grad_sqnr_gaps({"grads": off["grads"], "reference_grads": runs["reference"]["grads"]}, hp_grads)
        assert max(gaps.values()) < GRAD_SQNR_GAP_DB, (recipe, gaps)
        assert not off["wrapped"] and runs["on"]["wrapped"]
        for name in ("on", "on_no_precompute", "on_precompute_once", "on_compiled"):
            run = runs[name]
            assert run["losses"] == off["losses"], (recipe, name)
            assert _same_state(run["grads"], off["grads"]), (recipe, name)
            assert _same_state(run["weights"], off["weights"]), (recipe, name)
            assert _same_state(run["fp8"], off["fp8"]), (recipe, name)
            assert run["state_dict_types"] == {"Tensor"}, run["state_dict_types"]  # plain tensors in state_dict
        assert _rel_diff(off["losses"], runs["reference"]["losses"]) < FSDP_TOLERANCE, (recipe, off, runs["reference"])
        # every rank ends with the same fp8 state (delayed: all-reduced amax) and weights
        assert _same_state(ranks[1][recipe]["on"]["fp8"], ranks[0][recipe]["on"]["fp8"])
        assert _same_state(ranks[1][recipe]["on"]["weights"], runs["on"]["weights"])

    # which all-reduces and shard casts ran. Per step: 2 blocks x 2 layers gathered in forward and
    # again in backward, + the head once = 9 all-gathers; 5 weights, so 5 casts: the backward
    # all-gather reuses the forward's bytes (FSDP2 all-gathers under no_grad), and after the fused
    # precompute every all-gather takes the bytes it cast in one go
    tw = ranks[0]["tensorwise"]
    for name in ("on", "on_compiled"):
        assert tw[name]["all_reduces"] == {"precompute_float8_dynamic_scale_for_fsdp": 4}  # one fused per step
        assert tw[name]["casts"] == {"_precast": 4 * 5}  # none on the all-gather path
    assert tw["on_no_precompute"]["all_reduces"] == {"_weight_scale": 4 * 5}  # one per forward all-gather
    assert tw["on_no_precompute"]["casts"] == {"_pre_all_gather": 4 * 5}
    # precomputed before step 1 only: the optimizer step makes it stale, later steps compute their own
    assert tw["on_precompute_once"]["all_reduces"] == {"_weight_scale": 3 * 5}
    assert tw["on_precompute_once"]["casts"] == {"_pre_all_gather": 3 * 5}
    dl = ranks[0]["delayed"]
    assert len(dl["on"]["fp8"]) == 5 * 12
    # delayed: the stored scale after the first sync; before it, the dynamic scale (step 1 only)
    assert dl["on"]["all_reduces"] == {"_weight_scale": 5, "_sync_group": 4}
    assert dl["on"]["casts"] == {"_pre_all_gather": 4 * 5}


@pytest.mark.slow
def test_tensor_parallel_two_ranks_matches_single_process(tmp_path):
    ranks = _launch("tp", tmp_path)
    hp_grads = ranks[0].pop("hp_grads")
    ranks[1].pop("hp_grads")
    assert set(ranks[0]) == {"tensorwise/tp", "tensorwise/sp", "delayed/tp", "delayed/sp", "delayed/stock", "rowwise/tp"}
    for case, r in ranks[0].items():
        assert r["weight_type"] == "DTensor"
        assert _rel_diff(r["losses"], r["reference"]) < TP_TOLERANCE, (case, r["losses"], r["reference"])
        gaps = _grad_sqnr_gaps(r, hp_grads)
        assert max(gaps.values()) < GRAD_SQNR_GAP_DB, (case, gaps)
        assert _same_state(r["fp8"], ranks[1][case]["fp8"]), case  # identical delayed scales on both ranks
        assert _same_state(r["weights"], ranks[1][case]["weights"]), case  # replicated params stay in step
    for case in ("delayed/tp", "delayed/sp", "delayed/stock"):
        assert len(ranks[0][case]["fp8"]) == 5 * 12
        assert all(v.device.type == "cpu" and type(v) is torch.Tensor for v in ranks[0][case]["fp8"].values())
    # PyTorch's own styles give the same numbers as the fp8 styles (no sequence parallelism)
    assert ranks[0]["delayed/stock"]["losses"] == ranks[0]["delayed/tp"]["losses"]


@pytest.mark.slow
def test_two_d_mesh_tensor_parallel_times_fsdp2_with_fp8_all_gather(tmp_path):
    ranks = _launch("fsdp_tp", tmp_path, nproc=4)
    hp_grads = ranks[0].pop("hp_grads")
    for other in ranks[1:]:
        other.pop("hp_grads")
    for recipe, r in ranks[0].items():
        assert r["local_type"] == "Float8AllGatherWeight"
        assert r["placements"].count("Shard(dim=") == 2  # sharded along dp and tp (a 2-D DTensor)
        assert _rel_diff(r["losses"], r["reference"]) < TP_TOLERANCE, (recipe, r["losses"], r["reference"])
        gaps = _grad_sqnr_gaps(r, hp_grads)
        assert max(gaps.values()) < GRAD_SQNR_GAP_DB, (recipe, gaps)
        for other in ranks[1:]:
            assert other[recipe]["losses"] == r["losses"]
            assert _same_state(other[recipe]["fp8"], r["fp8"])
            assert _same_state(other[recipe]["weights"], r["weights"])
    # dynamic: one fused precompute per step and no per-layer fallback; it all-reduces once per mesh
    # dim: twice for the blocks' 2-D weights, once for the head (FSDP only, on the dp mesh)
    assert ranks[0]["tensorwise"]["all_reduces"] == {"precompute_float8_dynamic_scale_for_fsdp": 3 * 4}
    assert ranks[0]["tensorwise"]["casts"] == {"_precast": 5 * 4}  # the precompute cast every shard
    assert ranks[0]["delayed"]["casts"] == {"_pre_all_gather": 5 * 4}  # forward only: backward reuses
    # delayed, synced over the 2-D DeviceMesh: one all-reduce per mesh dim and step (scales identical on
    # all 4 ranks, checked above); before the first sync each all-gather reduces its own amax
    assert ranks[0]["delayed"]["all_reduces"] == {"_sync_group": 2 * 4, "_weight_scale": 5}


@pytest.mark.slow
def test_dcp_round_trip_resumes_identically(tmp_path):
    ranks = _launch("dcp", tmp_path)
    for recipe, r in ranks[0].items():
        assert r["wrapped"]
        assert r["resumed"] == r["uninterrupted"], (recipe, r["resumed"], r["uninterrupted"])
        assert _same_state(r["loaded_fp8"], r["saved_fp8"])
        assert ".metadata" in r["files"] and sum(f.endswith(".distcp") for f in r["files"]) == 2
    assert len(ranks[0]["delayed"]["saved_fp8"]) == 5 * 12
    assert ranks[0]["delayed"]["amax_initialized"] == [True] * 5  # loading marks synced layers


@pytest.mark.slow
def test_weights_edited_after_the_precompute_are_the_ones_gathered(tmp_path):
    """The fused precompute caches each shard's fp8 bytes until the next optimizer step; an in-place
    edit through the FSDP2 parameter, load_state_dict, set_model_state_dict after a DCP load or an
    nn.init must invalidate them (seen wrong before: the forward used the pre-edit weights)."""
    for rank in _launch("edits", tmp_path):
        for edit, r in rank.items():
            assert r["same"], (edit, r["diff"])


@pytest.mark.slow
def test_lightning_model_parallel_tp_x_fsdp_resumes_from_sharded_checkpoint_identically(tmp_path):
    # configure_model: Float8Training.convert -> parallelize_module (fp8train.tp) -> fully_shard;
    # ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2), fp8 all-gather on
    script = os.path.join(os.path.dirname(__file__), "scripts", "lightning_model_parallel.py")
    inherited = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in inherited and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", script,
           "delayed,tensorwise", "2", "2", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    for recipe in ("delayed", "tensorwise"):
        for r in ranks:
            run = r[recipe]
            assert run["sharded_checkpoint"] and run["resumed"]["wrapped"]
            # dynamic scaling: Float8Training ran the fused precompute after the last optimizer step
            assert run["full"]["precomputed_scale_ready"] == (recipe == "tensorwise")
            full, first, resumed = run["full"], run["first"], run["resumed"]
            assert len(full["losses"]) == 6 and first["losses"] == full["losses"][:3]
            assert _same_state(resumed["start"], first["state"])  # restored: weights and fp8 buffers
            assert resumed["losses"] == full["losses"][3:]  # and the run continues identically
            assert _same_state(resumed["state"], full["state"])
        assert len([k for k in ranks[0][recipe]["full"]["state"] if ".fp8_" in k]) == (60 if recipe == "delayed" else 0)
        # tensor-parallel peers (ranks 0/1 and 2/3) see the same data and agree on everything
        assert _same_state(ranks[0][recipe]["full"]["state"], ranks[1][recipe]["full"]["state"])
        assert ranks[2][recipe]["full"]["losses"] == ranks[3][recipe]["full"]["losses"]


@pytest.mark.slow
def test_bench_fsdp_script_runs_on_two_cpu_ranks(tmp_path):
    # the GPU benchmark's code path end to end (meta init, convert, fully_shard, materialise, AdamW,
    # delayed sync, fp8 all-gather precompute) with a tiny model; its numbers mean nothing on CPU
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_fsdp.py")
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, "--cpu",
           "--model", "llama_tiny", "--seq", "64", "--batch", "2", "--warmup", "1", "--steps", "2", "--no-compile",
           "--cases", "bf16", "tensorwise+ag", "delayed+ag", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["meta"]["world_size"] == 2 and list(report["results"]) == ["bf16", "tensorwise+ag", "delayed+ag"]
    losses = [r["final_loss"] for r in report["results"].values()]
    assert max(losses) - min(losses) < 0.05 * losses[0]  # same model and data: fp8 trains like bf16
    assert "tensorwise+ag" in proc.stdout and "speedup" in proc.stdout

    bad = subprocess.run([sys.executable, script, "--cpu", "--cases", "rowwise+ag"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "enable_fsdp_float8_all_gather" in bad.stderr, bad.stderr[-2000:]
    bad = subprocess.run([sys.executable, script, "--cpu", "--tp", "3", "--cases", "bf16"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "--tp 3 must be a positive divisor of the world size 1" in bad.stderr, bad.stderr[-2000:]

    # tensor parallel: the two ranks form one TP group (same tokens), fp8 GEMMs on local shards
    tp_out = tmp_path / "bench_tp.json"
    tp_cmd = cmd[: cmd.index("--cases")] + ["--tp", "2", "--cases", "bf16", "tensorwise", "--out", str(tp_out)]
    proc = subprocess.run(tp_cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    tp = json.loads(tp_out.read_text())
    assert tp["meta"]["tensor_parallel"] == 2 and "x TP 2" in proc.stdout
    assert tp["results"]["tensorwise"]["final_loss"] == pytest.approx(tp["results"]["bf16"]["final_loss"], rel=0.05)


@pytest.mark.gpu
def test_gpu_fsdp2_fp8_all_gather_on_one_gpu_trains_like_hp_all_gather(tmp_path):
    # world size 1 (NCCL), real _scaled_mm, compiled blocks: the all-gather extension and the fused
    # precompute on CUDA. Run: pytest -m gpu tests/test_distributed.py
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a GPU with fp8 tensor cores (sm_89+)")
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_fsdp.py")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, script, "--model", "llama_tiny", "--seq", "128", "--batch", "8", "--warmup", "3",
           "--steps", "3", "--no-auto-filter", "--cases", "bf16", "tensorwise", "tensorwise+ag", "delayed", "delayed+ag",
           "--out", str(out)]  # tiny layers: the auto filter would keep them all in bf16
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())["results"]
    for recipe in ("tensorwise", "delayed"):
        # same scales with or without fp8 all-gather; compiled code may round the scale differently
        assert r[f"{recipe}+ag"]["final_loss"] == pytest.approx(r[recipe]["final_loss"], rel=1e-3)
        assert r[recipe]["final_loss"] == pytest.approx(r["bf16"]["final_loss"], rel=0.03)

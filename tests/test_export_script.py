"""scripts/export.py end to end on CPU: train a tiny Llama with scripts/train.py (delayed scaling,
so the checkpoint holds fp8 state to drop), export it in every weight format, reload the exported
file, compare outputs with the float model."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fp8train.export import TernaryLinear, export_report
from fp8train.train.inference import (
    export_model,
    layer_sqnr,
    load_exported,
    load_float_model,
    sample_tokens,
    save_exported,
    sqnr_db,
    state_dict_bytes,
)

pytestmark = pytest.mark.slow  # subprocesses: a 3-step training run, one export

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ARGS = [
    "+recipe=llama_tiny_cpu_smoke", "fp8=delayed", "trainer.max_steps=3", "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "data.batch_size=2", "data.val_batches=1",
]

# SQNR (dB) vs the float model on the first validation batch [4, 64] of a 2-layer llama_tiny after
# 3 delayed-scaling steps, lm_head kept in high precision; measured 2026-11-26, torch 2.13 CPU:
#            logits   worst layer isolated   worst layer in model   linears compression
#   fp8      34.3     31.5                    26.5                   3.90x
#   int8     47.3     43.6                    38.5                   3.90x
#   ternary   4.5      5.8                     1.4                   14.47x  (post-training ternary is lossy)
THRESHOLDS = {"fp8": (32.0, 29.5, 24.5, 3.8), "int8": (45.0, 41.5, 36.5, 3.8), "ternary": (3.0, 4.5, 0.5, 14.0)}


def _run(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    proc = _run([str(ROOT / "scripts" / "train.py"), *TRAIN_ARGS, f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run / "checkpoints" / "last.ckpt"


def test_float_model_is_the_trained_weights_without_fp8_state(checkpoint):
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert any(".fp8_amax_history_" in k for k in ckpt["state_dict"])  # delayed scaling state was saved
    model = load_float_model(checkpoint)
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.layers[1].feed_forward.w2.weight, ckpt["state_dict"]["model.layers.1.feed_forward.w2.weight"])
    assert not any("fp8_" in k for k in model.state_dict())


@pytest.mark.parametrize("weight_format", ["fp8", "int8", "ternary"])
def test_export_reload_and_sqnr(checkpoint, tmp_path, weight_format):
    model = load_float_model(checkpoint)
    tokens = sample_tokens(checkpoint)
    assert tokens.shape == (4, 64) and tokens.dtype == torch.int64
    exported = export_model(model, weight_format, skip=["lm_head"])
    report = export_report(exported)
    assert len(report.exported) == 14 and list(report.skipped) == ["lm_head"]
    assert type(model.lm_head) is torch.nn.Linear  # the float model is left alone

    path = tmp_path / f"model.{weight_format}.pt"
    save_exported(path, exported, model.config)
    again = load_exported(path)
    with torch.no_grad():
        assert torch.equal(again(tokens), exported(tokens))  # the file reproduces the exported model
    assert state_dict_bytes(again) == state_dict_bytes(exported)

    rows, logits = layer_sqnr(model, exported, tokens)
    logits_min, isolated_min, in_model_min, compression_min = THRESHOLDS[weight_format]
    assert [r.name for r in rows] == report.exported
    assert logits > logits_min, logits
    assert min(r.isolated for r in rows) > isolated_min
    assert min(r.in_model for r in rows) > in_model_min
    assert report.compression > compression_min
    with torch.no_grad():
        assert sqnr_db(exported(tokens), model(tokens)) == logits


def test_cli_writes_the_model_and_reports_sqnr_and_size(checkpoint, tmp_path):
    out = tmp_path / "model.ternary.pt"
    proc = _run([str(ROOT / "scripts" / "export.py"), str(checkpoint), "--weight-format", "ternary", "--out", str(out),
                 "--skip", "lm_head", "layers.0.*"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith(("layers.", "logits"))]
    assert table == [f"layers.1.{m}" for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")] + ["logits"]
    assert "exported linears:" in proc.stdout and "whole model state_dict:" in proc.stdout

    blob = torch.load(out, map_location="cpu", weights_only=True)
    assert blob["weight_format"] == "ternary" and sorted(blob["sqnr_db"]["layers"]) == sorted(blob["exported"])
    assert len(blob["exported"]) == 7  # layer 1's seven linears
    model = load_exported(out)
    assert isinstance(model.layers[1].attention.wq, TernaryLinear)
    assert type(model.layers[0].attention.wq) is torch.nn.Linear
    # the same export in process gives the same outputs and the same reported numbers
    float_model = load_float_model(checkpoint)
    expected = export_model(float_model, "ternary", skip=["lm_head", "layers.0.*"])
    tokens = sample_tokens(checkpoint)
    with torch.no_grad():
        assert torch.equal(model(tokens), expected(tokens))
    rows, logits = layer_sqnr(float_model, expected, tokens)
    assert blob["sqnr_db"]["logits"] == pytest.approx(logits)
    assert blob["sqnr_db"]["layers"]["layers.1.feed_forward.w2"]["isolated"] == pytest.approx(rows[-2].isolated)
    assert blob["bytes"]["model_after"] < blob["bytes"]["model_before"]


def _export_main():
    spec = importlib.util.spec_from_file_location("export_script", ROOT / "scripts" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_bad_inputs_exit_2(tmp_path, capsys):
    main = _export_main()
    not_a_ckpt = tmp_path / "x.ckpt"
    torch.save({"weights": torch.zeros(1)}, not_a_ckpt)
    out = str(tmp_path / "o.pt")
    for path, words in ((not_a_ckpt, "not a LlamaLightningModule checkpoint"), (tmp_path / "none.ckpt", "no such file")):
        assert main([str(path), "--weight-format", "int8", "--out", out]) == 2
        assert words in capsys.readouterr().err
    assert main([str(not_a_ckpt), "--weight-format", "int8", "--out", out, "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(not_a_ckpt), "--weight-format", "int4", "--out", out])
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()

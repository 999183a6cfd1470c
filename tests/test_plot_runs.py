"""scripts/plot_runs.py on synthetic CSVLogger files (no training)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "plot_runs.py"
LAYERS = ["model.layers.0.attention.wq", "model.layers.0.feed_forward.w2"]


def _load():
    spec = importlib.util.spec_from_file_location("plot_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _write_run(run_dir: Path, recipe: str, fp8: bool, steps: int = 30) -> Path:
    """A run dir as scripts/train.py leaves it: csv/metrics.csv (sparse rows, like Lightning's) + summary.json."""
    rows = []
    for step in range(steps):
        rows.append({"step": step, "epoch": 0, "train/loss": 5.0 * math.exp(-step / 10), "train/tokens_per_s": 1e4})
        if fp8 and step % 5 == 4:
            row = {"step": step}
            for i, layer in enumerate(LAYERS):
                for role in ("input", "weight", "grad_output"):
                    amax = (i + 1) * 0.1 * (1 + step / 30)
                    row[f"fp8/{layer}/{role}/amax"] = amax
                    row[f"fp8/{layer}/{role}/scale"] = 448 / amax
                    row[f"fp8/{layer}/{role}/wasted_bits"] = 0.5
            row["fp8/model/saturation_max"] = 0.0
            rows.append(row)
        if step % 10 == 9:
            rows.append({"step": step, "epoch": 0, "val/loss": 5.2 * math.exp(-step / 10), "val/ppl": 3.0})
    keys = sorted(set().union(*rows))
    (run_dir / "csv").mkdir(parents=True)
    with (run_dir / "csv" / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (run_dir / "summary.json").write_text(json.dumps({"fp8_recipe": recipe}))
    return run_dir


@pytest.fixture
def sweep(tmp_path):
    _write_run(tmp_path / "sweep" / "0", "off", fp8=False)
    _write_run(tmp_path / "sweep" / "1", "tensorwise", fp8=True)
    _write_run(tmp_path / "sweep" / "2", "delayed", fp8=True)
    (tmp_path / "sweep" / "multirun.yaml").write_text("hydra: {}\n")
    return tmp_path / "sweep"


def test_reads_sparse_columns(sweep):
    pr = _load()
    series = pr.read_metrics(sweep / "1" / "csv" / "metrics.csv")
    steps, values = series["train/loss"]
    assert steps == list(range(30)) and values[0] == pytest.approx(5.0)
    assert series["val/loss"][0] == [9, 19, 29]
    assert series[f"fp8/{LAYERS[0]}/weight/amax"][0] == [4, 9, 14, 19, 24, 29]


def test_plots_loss_and_fp8_panels(sweep, tmp_path):
    pr = _load()
    runs = pr.load_runs([sweep])  # a sweep dir expands into its runs, in job order
    assert [r.label for r in runs] == ["bf16 (fp8 off)", "tensorwise", "delayed"]
    assert runs[0].fp8("amax", "input", "*") == {}
    assert set(runs[1].fp8("amax", "weight", "*")) == set(LAYERS)
    assert set(runs[1].fp8("amax", "weight", "*.w2")) == {LAYERS[1]}
    out = tmp_path / "plot.png"
    titles = pr.plot(runs, out, ["amax", "scale", "underflow"])
    assert titles[0] == "loss"
    assert "fp8 grad_output amax" in titles and "fp8 weight scale" in titles
    assert not any("underflow" in t for t in titles)  # not logged: no empty row
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli(sweep, tmp_path):
    out = tmp_path / "cmp.png"
    args = [sys.executable, str(SCRIPT), *[str(p) for p in sorted(sweep.iterdir())], "--out", str(out),
            "--stats", "amax,wasted_bits", "--layers", "*.wq"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "3 run(s), loss + 6 fp8 panel(s)" in proc.stdout
    assert "skipping" in proc.stderr and "multirun.yaml" in proc.stderr
    assert out.is_file()


def test_cli_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), str(empty)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no metrics.csv" in proc.stderr
    run = _write_run(tmp_path / "r", "tensorwise", fp8=True)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(run), "--stats", "amaks"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "amaks" in proc.stderr and "amax" in proc.stderr


def test_bf16_only_runs_plot_loss(tmp_path):
    pr = _load()
    runs = pr.load_runs([_write_run(tmp_path / "a", "off", fp8=False)])
    assert pr.plot(runs, tmp_path / "p.png", ["amax"]) == ["loss"]

"""The end-of-run summary (one screen, and ``summary.json`` for benchmarks) and a sweep table.

``summary.json`` holds every field of :class:`RunSummary` (``null`` where a value does not exist,
e.g. MFU and peak memory on CPU), plus ``"version"``.

``SweepSummary`` is a Hydra callback (``hydra.callbacks``) that, after a ``-m`` sweep, prints one
row per job from the jobs' ``summary.json`` files and writes them together as
``<sweep dir>/sweep_summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

__all__ = ["RunSummary", "SweepSummary", "SUMMARY_VERSION"]

SUMMARY_VERSION = 1


def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


@dataclass
class RunSummary:
    """What a run did, as numbers (units in the field names or below).

    Attributes:
        fp8_all_gather_layers: layers whose weight FSDP2 all-gathers in fp8
            (``enable_fsdp_float8_all_gather``; 0 without FSDP2).
        tokens_per_s: training tokens per second, all ranks together, measured from the end of
            step 2 (after compilation and warmup) with validation time excluded.
        mfu: model FLOPs utilisation per device, a fraction (``None`` on CPU or an unknown GPU).
        peak_mem_gib: max over ranks of ``torch.cuda.max_memory_allocated`` (``None`` on CPU).
        train_loss: mean training loss over the last steps (up to 20), averaged over ranks.
        wall_seconds: from the start of the run (before building anything) to the end.
    """

    model: str
    params: int
    fp8_recipe: str
    fp8_emulated: bool
    fp8_layers: int
    fp8_skipped: list[str] = field(default_factory=list)
    fp8_fallback: list[str] = field(default_factory=list)
    fp8_all_gather_layers: int = 0
    steps: int = 0
    tokens: int = 0
    batch_size: int = 0
    seq_len: int = 0
    world_size: int = 1
    device: str = "cpu"
    device_name: str = "cpu"
    precision: str = ""
    train_loss: float | None = None
    val_loss: float | None = None
    val_ppl: float | None = None
    tokens_per_s: float | None = None
    tokens_per_s_per_device: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    train_seconds: float | None = None
    wall_seconds: float = 0.0
    output_dir: str = ""
    metrics_csv: str | None = None

    def format(self) -> str:
        """A fixed-width block of about 15 lines."""
        fp8 = self.fp8_recipe
        if self.fp8_recipe != "off":
            fp8 += f" ({'emulated' if self.fp8_emulated else 'scaled_mm'}), {self.fp8_layers} layers in fp8"
            if self.fp8_skipped:
                fp8 += f", {len(self.fp8_skipped)} kept in high precision ({_short(self.fp8_skipped)})"
            if self.fp8_fallback:
                fp8 += f", {len(self.fp8_fallback)} fell back ({_short(self.fp8_fallback)})"
            if self.fp8_all_gather_layers:
                fp8 += f", {self.fp8_all_gather_layers} weights all-gathered in fp8"
        mfu = _pct(self.mfu)
        mem = "n/a (CPU)" if self.peak_mem_gib is None and self.device == "cpu" else _num(self.peak_mem_gib, ".2f")
        rows = [
            ("model", f"{self.model} ({self.params / 1e6:.1f}M params)"),
            ("fp8", fp8),
            ("device", f"{self.world_size} x {self.device_name}, precision {self.precision}"),
            ("steps", f"{self.steps} ({self.tokens:,} tokens, batch {self.batch_size} x seq {self.seq_len} per rank)"),
            ("train loss", _num(self.train_loss, ".4f") + " (mean of the last steps)"),
            ("val loss", f"{_num(self.val_loss, '.4f')} (ppl {_num(self.val_ppl, '.2f')})"),
            ("tokens/s", f"{_num(self.tokens_per_s, ',.0f')} ({_num(self.tokens_per_s_per_device, ',.0f')} per device)"),
            ("MFU", mfu),
            ("peak memory", mem + (" GiB" if self.peak_mem_gib is not None else "")),
            ("wall time", f"{self.wall_seconds:.1f} s (training {_num(self.train_seconds, '.1f')} s)"),
            ("run dir", self.output_dir),
        ]
        width = max(len(k) for k, _ in rows)
        line = "=" * 72
        return "\n".join([line, "run summary", line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])

    def to_dict(self) -> dict[str, Any]:
        return {"version": SUMMARY_VERSION, **dataclasses.asdict(self)}

    def write(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON (``NaN`` becomes ``null``)."""

        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and not math.isfinite(v) else v

        data = {k: clean(v) for k, v in self.to_dict().items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2) + "\n")

    @staticmethod
    def read(path: str | Path) -> "RunSummary":
        data = json.loads(Path(path).read_text())
        data.pop("version", None)
        known = {f.name for f in dataclasses.fields(RunSummary)}
        return RunSummary(**{k: v for k, v in data.items() if k in known})


def _pct(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1%}" if v >= 0.01 else f"{v:.3%}"  # tiny models on big GPUs: keep a digit


def _short(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


class SweepSummary(HydraCallback):
    """After a multirun, one table row per job (from each job's ``summary.json``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if os.environ.get("RANK", "0") != "0":  # torchrun: every rank runs the sweep; one reports
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = []
        for path in sorted(sweep_dir.glob("*/summary.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
            s = RunSummary.read(path)
            rows.append((path.parent.name, s))
        if not rows:
            return
        header = f"{'job':<6} {'fp8':<20} {'layers':>6} {'train loss':>10} {'val loss':>9} {'tokens/s':>11} {'MFU':>6}"
        lines = [header, "-" * len(header)]
        for job, s in rows:
            mfu = _pct(s.mfu)
            lines.append(
                f"{job:<6} {s.fp8_recipe:<20} {s.fp8_layers:>6} {_num(s.train_loss, '.4f'):>10} "
                f"{_num(s.val_loss, '.4f'):>9} {_num(s.tokens_per_s, ',.0f'):>11} {mfu:>6}"
            )
        print(f"sweep summary ({sweep_dir}):\n" + "\n".join(lines), flush=True)
        out = {job: s.to_dict() for job, s in rows}
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(out, indent=2) + "\n")

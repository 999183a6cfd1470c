#!/usr/bin/env python
"""Compare training runs: loss curves and fp8 scaling statistics from the CSV logger's metrics.csv.

    python scripts/plot_runs.py multirun/2025-01-01/12-00-00 --out compare.png   # every job of a sweep
    python scripts/plot_runs.py outputs/a outputs/b --stats amax,scale,wasted_bits --layers "*.w2"

Each RUN_DIR is a run directory of ``scripts/train.py`` (its ``csv/metrics.csv``), a directory of
runs (a sweep: every metrics.csv below it is a run), or a metrics.csv file. Runs are labelled by their fp8 recipe (from ``summary.json``), or
by directory name.

The figure has one row for the losses (``train/loss`` as lines, ``val/loss`` as dashed lines with
markers, one colour per run) and, for each statistic in ``--stats`` that some run logged, one row
with a panel per operand role (input, weight, grad_output): one line per layer, from the
``fp8/<layer>/<role>/<stat>`` columns the ``Float8Training`` callback writes. amax and scale are
drawn on a log scale. Exit status 2: a RUN_DIR without a metrics.csv, or an unknown statistic.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

ROLES = ("input", "weight", "grad_output")
STATS = ("amax", "scale", "wasted_bits", "saturation", "underflow", "nonfinite")
LOG_SCALE = {"amax", "scale"}

Series = tuple[list[int], list[float]]


@dataclass
class Run:
    """The logged series of one run: ``column -> (steps, values)``, empty cells dropped."""

    label: str
    path: Path
    series: dict[str, Series] = field(default_factory=dict)

    def fp8(self, stat: str, role: str, layers: str) -> dict[str, Series]:
        """``layer -> series`` of ``fp8/<layer>/<role>/<stat>`` for layers matching the glob."""
        out = {}
        for col, s in self.series.items():
            parts = col.split("/")
            if len(parts) == 4 and parts[0] == "fp8" and parts[2] == role and parts[3] == stat:
                if parts[1] != "model" and fnmatch.fnmatchcase(parts[1], layers):
                    out[parts[1]] = s
        return out


def find_runs(path: Path) -> list[tuple[Path, Path]]:
    """``(run dir, metrics.csv)`` of each run at or below ``path``, in job order.

    ``path`` may be a metrics.csv file, a run directory, or a directory of runs (a sweep dir).
    """
    if path.is_file():
        return [(path.parent.parent if path.parent.name == "csv" else path.parent, path)]
    found = sorted(path.glob("**/metrics.csv"), key=lambda p: [(len(s), s) for s in p.parts])
    if not found:
        raise FileNotFoundError(
            f"{str(path)!r} holds no metrics.csv; pass a run directory of scripts/train.py with the csv logger "
            f"(logger=csv, the default), a sweep directory, or a metrics.csv file"
        )
    return [(m.parent.parent if m.parent.name == "csv" else m.parent, m) for m in found]


def read_metrics(path: Path) -> dict[str, Series]:
    """Every numeric column of a Lightning CSVLogger file, indexed by its ``step`` column."""
    series: dict[str, Series] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row.get("step") or ""))
            except ValueError:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    v = float(value)
                except ValueError:
                    continue
                steps, values = series.setdefault(key, ([], []))
                steps.append(step)
                values.append(v)
    return series


def label_of(run_dir: Path) -> str:
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            recipe = json.loads(summary.read_text()).get("fp8_recipe")
        except ValueError:
            recipe = None
        if recipe:
            return "bf16 (fp8 off)" if recipe == "off" else str(recipe)
    return run_dir.name


def load_runs(paths: list[Path], labels: list[str] | None = None) -> list[Run]:
    """The runs at ``paths`` (files other than .csv are skipped: ``sweep/*`` globs yaml too)."""
    found: list[tuple[Path, Path]] = []
    for p in paths:
        if p.is_file() and p.suffix != ".csv":
            print(f"plot_runs: skipping {str(p)!r} (not a run directory or a .csv file)", file=sys.stderr)
            continue
        found += find_runs(p)
    if not found:
        raise FileNotFoundError(f"no runs in {[str(p) for p in paths]}")
    run_dirs = [d for d, _ in found]
    runs = [Run(label_of(d), m) for d, m in found]
    if labels:
        if len(labels) != len(runs):
            raise ValueError(f"--labels has {len(labels)} names for {len(runs)} runs ({[str(d) for d in run_dirs]})")
        for run, label in zip(runs, labels):
            run.label = label
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run, d in zip(runs, run_dirs):
        if counts[run.label] > 1:  # same recipe twice: tell them apart by directory
            run.label = f"{run.label} ({d.name})"
        run.series = read_metrics(run.path)
    return runs


def plot(runs: list[Run], out: Path, stats: list[str], layers: str = "*") -> list[str]:
    """Draw the figure into ``out``; returns the titles of the panels drawn."""
    rows = [s for s in stats if any(run.fp8(s, r, layers) for run in runs for r in ROLES)]
    fig = plt.figure(figsize=(15, 3.6 * (1 + len(rows))), constrained_layout=True)
    grid = fig.add_gridspec(1 + len(rows), len(ROLES))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    titles = []

    ax = fig.add_subplot(grid[0, :])
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        if "train/loss" in run.series:
            ax.plot(*run.series["train/loss"], color=c, lw=1.2, label=f"{run.label} train")
        if "val/loss" in run.series:
            ax.plot(*run.series["val/loss"], color=c, lw=1.2, ls="--", marker="o", ms=4, label=f"{run.label} val")
    ax.set(title="loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    titles.append("loss")

    for r, stat in enumerate(rows, start=1):
        for j, role in enumerate(ROLES):
            ax = fig.add_subplot(grid[r, j])
            title = f"fp8 {role} {stat}"
            drawn = False
            for i, run in enumerate(runs):
                per_layer = run.fp8(stat, role, layers)
                for k, (layer, (x, y)) in enumerate(sorted(per_layer.items())):
                    if stat in LOG_SCALE:
                        x, y = zip(*[(a, b) for a, b in zip(x, y) if b > 0 and math.isfinite(b)]) or ((), ())
                    ax.plot(x, y, color=colors[i % len(colors)], lw=0.8, alpha=0.6,
                            label=run.label if k == 0 else None)
                    drawn = drawn or bool(x)
            if stat in LOG_SCALE and drawn:
                ax.set_yscale("log")
            ax.set(title=title, xlabel="step")
            ax.grid(alpha=0.3)
            if drawn:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
            titles.append(title)
    fig.suptitle(f"{len(runs)} run(s); fp8 panels: one line per layer" + (f" matching {layers!r}" if layers != "*" else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return titles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run or sweep directories, or metrics.csv files")
    parser.add_argument("--out", type=Path, default=Path("runs.png"), help="image to write (default: runs.png)")
    parser.add_argument("--stats", default="amax,scale",
                        help=f"comma-separated fp8 statistics to plot, from {','.join(STATS)} (default: amax,scale)")
    parser.add_argument("--layers", default="*", help="glob over layer names, e.g. '*.w2' (default: all)")
    parser.add_argument("--labels", default=None, help="comma-separated legend names, one per RUN_DIR")
    args = parser.parse_args(argv)
    stats = [s for s in args.stats.split(",") if s]
    bad = [s for s in stats if s not in STATS]
    if bad:
        print(f"plot_runs: --stats {bad} unknown; valid: {list(STATS)}", file=sys.stderr)
        return 2
    try:
        runs = load_runs(args.run_dirs, args.labels.split(",") if args.labels else None)
    except (FileNotFoundError, ValueError) as e:
        print(f"plot_runs: {e}", file=sys.stderr)
        return 2
    titles = plot(runs, args.out, stats, args.layers)
    fp8_panels = len(titles) - 1
    note = "" if fp8_panels else " (no fp8/... columns: fp8 off, or fp8.stats=off)"
    print(f"wrote {args.out}: {len(runs)} run(s), loss + {fp8_panels} fp8 panel(s){note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

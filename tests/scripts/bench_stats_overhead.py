"""Per-step cost of Float8Training's statistics: stats="off" vs "summary" vs "detailed".

    python tests/scripts/bench_stats_overhead.py [--device cpu|cuda] [--dim 512] [--layers 4] [--tokens 1024]
                                                 [--emulate/--no-emulate]

For each recipe and mode it trains a ``layers``-deep MLP (``dim`` wide, ``tokens`` rows per batch)
for ``--steps`` optimizer steps, sampling every ``--log-every`` steps, and reports the median time
of sampled steps and of the other steps. "extra/sampled" is a sampled step's cost over a step of
the stats=off/guard-off run; divided by 50 it is the average per-step cost at Lightning's default
``log_every_n_steps=50``. The logger drops the metrics, so this is the callback's cost, not a
logger's I/O.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import Logger

from fp8train import Float8LinearConfig
from fp8train.lightning import Float8Training


class NullLogger(Logger):
    name, version = "null", 0

    def log_metrics(self, metrics, step=None):
        self.n = getattr(self, "n", 0) + len(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class MLP(L.LightningModule):
    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.net = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(dim, dim), nn.GELU())])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class StepTimer(Callback):
    def __init__(self):
        self.times: list[tuple[int, float]] = []

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        self.times.append((trainer.global_step, time.perf_counter() - self.t0))


def run(args, recipe: str, stats: str | None, guard: int | None, log_every: int) -> tuple[float, float]:
    torch.manual_seed(0)
    x = torch.randn(args.tokens * (args.steps + 1), args.dim)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x), batch_size=args.tokens)
    timer = StepTimer()
    cbs: list[Callback] = [timer]
    if stats is not None:
        cfg = Float8LinearConfig.from_recipe_name(recipe, emulate=args.emulate)
        cbs.insert(0, Float8Training(cfg, stats=stats, guard_every_n_steps=guard, auto_filter=False))
    trainer = L.Trainer(accelerator=args.device, devices=1, max_steps=args.steps, log_every_n_steps=log_every,
                        callbacks=cbs, logger=NullLogger(), enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(MLP(args.dim, args.layers), data)
    timed = timer.times[args.warmup:]
    sampled = [t for step, t in timed if step % log_every == 0]  # global_step after the step, 1-based
    other = [t for step, t in timed if step % log_every != 0]
    med = lambda v: statistics.median(v) * 1e3 if v else float("nan")  # noqa: E731
    return med(sampled), med(other)


def micro(args) -> None:
    """Interleaved A/B/C timing of one fwd+bwd without hooks, with the guard's saturation-only probe,
    and with the full (stats="detailed") probe: robust to a busy machine, probe cost only."""
    from fp8train import convert_to_float8_training, sync_float8_amax_and_scale_history
    from fp8train.metrics import OperandProbe

    for recipe in args.recipes.split(","):
        torch.manual_seed(0)
        cfg = Float8LinearConfig.from_recipe_name(recipe, emulate=args.emulate)
        model = convert_to_float8_training(MLP(args.dim, args.layers).net.to(args.device), config=cfg, auto_filter=False)
        layers = [m for m in model.modules() if hasattr(m, "fp8_enabled")]
        x = torch.randn(args.tokens, args.dim, device=args.device)
        delayed = [tuple(getattr(m.config, f"cast_config_{r}").scaling_type.value == "delayed"
                         for r in ("input", "weight", "grad_output")) for m in layers]
        probes = {"none": None,
                  "guard (saturation only)": OperandProbe(layers, delayed, full=False),
                  "detailed (full)": OperandProbe(layers, [(True, True, True)] * len(layers))}
        times: dict[str, list[float]] = {k: [] for k in probes}

        def step(probe):
            if probe is not None:
                probe.attach()
            model(x).pow(2).mean().backward()
            if probe is not None:
                probe.detach()
                probe.result()
            sync_float8_amax_and_scale_history(model)
            if args.device == "cuda":
                torch.cuda.synchronize()

        for i in range(args.warmup + args.steps):
            for name, probe in probes.items():
                t0 = time.perf_counter()
                step(probe)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["none"])
        for name, v in times.items():
            m = statistics.median(v)
            print(f"{recipe:<11} {name:<26} {m * 1e3:>9.2f} ms  {100 * (m - base) / base:>+7.1f}%", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--log-every", type=int, default=4,
                   help="sample every n steps; sampled and other steps are timed separately")
    p.add_argument("--emulate", action=argparse.BooleanOptionalAction, default=None,
                   help="emulated fp8 GEMMs (default on CPU: torch's CPU _scaled_mm is a slow reference "
                        "kernel, ~0.1 GFLOP/s, which would hide every other cost)")
    p.add_argument("--recipes", default="tensorwise,delayed")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--micro", action="store_true", help="only the interleaved probe-cost measurement")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.emulate is None:
        args.emulate = args.device == "cpu"
    if args.micro:
        print(f"fwd+bwd+sync of {args.layers} x Linear({args.dim}, {args.dim}) on {args.tokens} rows, "
              f"emulate={args.emulate}, interleaved, median over {args.steps}")
        micro(args)
        return
    n = args.log_every
    print(f"device={args.device} dim={args.dim} layers={args.layers} tokens={args.tokens} emulate={args.emulate} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}; sampling every {n} steps; median ms")
    print(f"{'recipe':<11} {'mode':<26} {'sampled step':>12} {'other step':>11} {'extra/sampled':>13} "
          f"{'avg extra at n=50':>17}")
    modes = [("off", 0, "stats=off, guard off"), ("off", None, "stats=off, guard on"),
             ("summary", None, "stats=summary (default)"), ("detailed", None, "stats=detailed")]
    for recipe in args.recipes.split(","):
        base = None
        for stats, guard, label in modes:
            s, o = run(args, recipe, stats, guard, n)
            base = o if base is None else base
            extra = s - base
            print(f"{recipe:<11} {label:<26} {s:>12.2f} {o:>11.2f} {extra:>+13.2f} {extra / 50:>+17.3f}", flush=True)
    s, o = run(args, "tensorwise", None, None, n)
    print(f"{'-':<11} {'no callback (high precision)':<26} {s:>12.2f} {o:>11.2f}")


if __name__ == "__main__":
    main()

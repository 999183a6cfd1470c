#!/usr/bin/env python
"""Pretrain a Llama with fp8 linears: a Hydra app over ``fp8train.train``.

    python scripts/train.py                                   # tiny Llama, embedded corpus, fp8 tensorwise
    python scripts/train.py fp8=delayed model=llama_125m trainer=gpu
    python scripts/train.py -m fp8=bf16,tensorwise,delayed,rowwise   # sweep + comparison table
    python scripts/train.py +recipe=llama_1b_1xh100           # a complete experiment from recipes/
    torchrun --nproc_per_node=4 scripts/train.py trainer=fsdp2 model=llama_1b
    python scripts/train.py --help                            # groups, options and the composed config

Configs: ``configs/`` (groups) and ``recipes/`` (``+recipe=NAME``). Each run writes to its Hydra run
dir (``outputs/<date>/<time>``, or ``hydra.run.dir=...``): ``csv/metrics.csv``, ``checkpoints/``,
``.hydra/config.yaml`` and ``summary.json``. Exit status 2 means a bad setting (the message names
the key), before anything trained.
"""

from __future__ import annotations

import time

_FIRST_START = [time.perf_counter()]  # the first run's wall time includes imports and startup

import sys  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fp8train.train import ConfigError, register_configs, train  # noqa: E402

register_configs()  # the typed schema, the `recipe` group (recipes/) and the config resolvers


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        started = _FIRST_START.pop() if _FIRST_START else time.perf_counter()  # later sweep jobs
        summary = train(cfg, started=started)
    except ConfigError as e:
        print(f"fp8train: invalid config: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return summary.val_loss  # the value a Hydra sweeper optimises


if __name__ == "__main__":
    main()

"""Pretraining with Lightning and Hydra: the LightningModule, typed config schemas, and the run.

The command line lives in ``scripts/train.py`` and the YAML in ``configs/`` (groups ``model``,
``data``, ``fp8``, ``trainer``, ``logger``) and ``recipes/`` (complete experiments, ``+recipe=NAME``)::

    python scripts/train.py                                  # llama_tiny, embedded corpus, fp8 tensorwise
    python scripts/train.py -m fp8=bf16,tensorwise,delayed   # sweep, with a comparison table at the end

From Python, without Hydra:

    >>> from fp8train.train import LlamaLightningModule, OptimConfig
    >>> module = LlamaLightningModule(LlamaConfig.from_name("llama_tiny"), OptimConfig(lr=3e-3))
"""

from fp8train.train.app import ConfigError, Run, build, train
from fp8train.train.module import LlamaLightningModule, OptimConfig, lr_lambda
from fp8train.train.parallel import FSDP2Strategy
from fp8train.train.schema import TrainConfig, register_configs
from fp8train.train.summary import RunSummary, SweepSummary

__all__ = [
    "ConfigError",
    "FSDP2Strategy",
    "LlamaLightningModule",
    "OptimConfig",
    "Run",
    "RunSummary",
    "SweepSummary",
    "TrainConfig",
    "build",
    "lr_lambda",
    "register_configs",
    "train",
]

"""Typed schemas for the Hydra app, registered in Hydra's ConfigStore.

The YAML under ``configs/`` is merged into these schemas while Hydra composes, so a misspelled key
(``trainer.max_stepz=3``) or a value of the wrong type (``model.dim=abc``) fails before anything
is built, with OmegaConf naming the full key. Values are then checked by the package's own
validated dataclasses (``LlamaConfig``, ``Float8LinearConfig``, ``TokenDataModule``) in
:func:`fp8train.train.app.build`, whose errors name the field, the value and the valid choices.

No schema is a hand-written copy of another class: the fields of

* :data:`ModelConf` are ``name`` (a ``LlamaConfig`` preset), ``compile``, plus every
  ``LlamaConfig`` field as an optional override (``None``: keep the preset's value);
* :data:`Fp8Conf` are ``recipe`` (an enum of ``fp8train.recipe_names()``, ``None`` for fp8 off),
  ``skip``, ``overrides`` (every ``Float8LinearConfig`` field, optional; passed to
  ``Float8LinearConfig.from_recipe_name``, which checks the values), plus
  the keyword-only arguments of ``Float8Training`` with their defaults;
* :data:`TrainerConf` are the keyword arguments of ``lightning.pytorch.Trainer`` (except
  ``logger`` and ``callbacks``, which come from the ``logger`` group and ``callbacks``).

Schemas are non-frozen dataclasses (OmegaConf needs to merge into them); the frozen, validated
dataclasses are built from them after composition.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import lightning.pytorch as pl
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from fp8train.config import Float8LinearConfig, recipe_names
from fp8train.lightning import Float8Training
from fp8train.models.llama import LlamaConfig

__all__ = [
    "DataConf",
    "Fp8Conf",
    "Fp8Overrides",
    "Fp8Recipe",
    "ModelConf",
    "OptimConf",
    "TrainConfig",
    "TrainerConf",
    "auto_precision",
    "register_configs",
]

_PRIMITIVES = (int, float, bool, str)


def _omegaconf_type(annotation: Any) -> Any:
    """The annotation if OmegaConf can enforce it (a primitive, optionally ``None``), else ``Any``."""
    if annotation in _PRIMITIVES:
        return annotation
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in _PRIMITIVES:
            return Optional[rest[0]]
    return Any


def _default_field(default: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d))
    return field(default=default)


def _keyword_fields(fn: Callable[..., Any], exclude: tuple[str, ...] = (), kinds: tuple = ()) -> list[tuple]:
    """``(name, type, field)`` for each parameter of ``fn`` of the given kinds, with its default."""
    out = []
    for name, p in inspect.signature(fn, eval_str=True).parameters.items():
        if name in exclude or name == "self" or p.kind not in kinds:
            continue
        default = MISSING if p.default is inspect.Parameter.empty else p.default
        out.append((name, _omegaconf_type(p.annotation), _default_field(default)))
    return out


def _optional_fields(cls: type) -> list[tuple]:
    """Every field of dataclass ``cls`` as ``Optional[...] = None`` (``None``: not overridden)."""
    hints = typing.get_type_hints(cls)
    return [
        (f.name, Optional[hints[f.name]] if hints[f.name] in _PRIMITIVES else Any, field(default=None))
        for f in dataclasses.fields(cls)
    ]


def _check_no_clash(schema: str, generated: list[tuple], own: list[str]) -> None:
    clash = sorted({f[0] for f in generated} & set(own))
    if clash:  # a field added upstream with one of our names: fail loudly rather than shadow it
        raise RuntimeError(f"{schema}: generated fields {clash} clash with its own fields {own}")


#: fp8 recipe names as an enum, so Hydra rejects an unknown ``fp8.recipe`` while composing and
#: lists the valid ones. Built from the registry: the CLI never offers a recipe the code rejects.
Fp8Recipe = enum.Enum("Fp8Recipe", {name: name for name in recipe_names()}, type=str)


# --- model ---------------------------------------------------------------------------------------
def _make_model_conf() -> type:
    overrides = _optional_fields(LlamaConfig)
    own = [
        ("name", str, field(default="llama_tiny")),
        ("compile", bool, field(default=False)),
    ]
    _check_no_clash("ModelConf", overrides, [n for n, *_ in own])
    return dataclasses.make_dataclass("ModelConf", own + overrides)


#: ``model:``: a ``LlamaConfig`` preset ``name`` (``LlamaConfig.names()``), any ``LlamaConfig``
#: field to override (``null`` keeps the preset's value), and ``compile`` (``torch.compile`` each
#: transformer block).
ModelConf = _make_model_conf()
ModelConf.__module__ = __name__


# --- fp8 -----------------------------------------------------------------------------------------
#: ``fp8.overrides``: every ``Float8LinearConfig`` field, ``null`` keeps the recipe's value. Nested
#: configs take a dict of their fields (``fp8.overrides.delayed_scaling={history_len: 32}``).
Fp8Overrides = dataclasses.make_dataclass("Fp8Overrides", _optional_fields(Float8LinearConfig))
Fp8Overrides.__module__ = __name__


def _make_fp8_conf() -> type:
    callback = _keyword_fields(Float8Training.__init__, kinds=(inspect.Parameter.KEYWORD_ONLY,))
    own = [
        ("recipe", Optional[Fp8Recipe], field(default=None)),
        ("skip", List[str], field(default_factory=lambda: ["lm_head"])),
        ("overrides", Fp8Overrides, field(default_factory=Fp8Overrides)),
    ]
    _check_no_clash("Fp8Conf", callback, [n for n, *_ in own])
    return dataclasses.make_dataclass("Fp8Conf", own + callback)


#: ``fp8:``: ``recipe`` (``null``: fp8 off, the high-precision baseline), ``skip`` (glob patterns of
#: linears kept in high precision, see ``Float8Training``), ``overrides`` (:data:`Fp8Overrides`,
#: e.g. ``fp8.overrides.emulate=true``), and the keyword-only
#: arguments of ``Float8Training`` (``stats``, ``on_divergence``, ...).
Fp8Conf = _make_fp8_conf()
Fp8Conf.__module__ = __name__


# --- trainer -------------------------------------------------------------------------------------
def _make_trainer_conf() -> type:
    kwargs = _keyword_fields(
        pl.Trainer.__init__,
        exclude=("logger", "callbacks"),
        kinds=(inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD),
    )
    own = [("_target_", str, field(default="lightning.pytorch.Trainer"))]
    _check_no_clash("TrainerConf", kwargs, ["_target_"])
    return dataclasses.make_dataclass("TrainerConf", own + kwargs)


#: ``trainer:``: the keyword arguments of ``lightning.pytorch.Trainer``, passed straight to it
#: (nested ``_target_`` nodes, e.g. a strategy object, are instantiated first).
TrainerConf = _make_trainer_conf()
TrainerConf.__module__ = __name__


# --- data and optimizer --------------------------------------------------------------------------
@dataclass
class DataConf:
    """``data:``: what ``fp8train.data.TokenDataModule`` reads.

    Attributes:
        path: ``"embedded"`` for the embedded byte-level corpus (vocab 256), or a flat token file.
        dtype: element type of the token file (``uint8``, ``uint16``, ``uint32``, ``int32``).
        vocab_size: the tokenizer's vocabulary; every id must be below it, and the model's
            ``vocab_size`` must be at least this (256 for the embedded corpus; required for a file).
        seq_len: tokens per sequence (``None``: the model's ``max_seq_len``).
        batch_size: sequences per micro-batch, per process.
        val_fraction: share of the tokens held out (at the end of the file).
        val_batches: fixed validation batches per validation run.
        samples_per_epoch: training windows per epoch (``None``: enough for the whole run, so no
            window repeats periodically; see ``TokenDataModule``).
        num_workers: DataLoader worker processes.
        seed: selects the training windows.
        embedded_max_bytes: size cap of the embedded corpus.
    """

    path: Optional[str] = "embedded"
    dtype: str = "uint16"
    vocab_size: Optional[int] = None
    seq_len: Optional[int] = None
    batch_size: int = 16
    val_fraction: float = 0.01
    val_batches: int = 8
    samples_per_epoch: Optional[int] = None
    num_workers: int = 0
    seed: int = 0
    embedded_max_bytes: int = 32 * 2**20


def _make_optim_conf() -> type:
    """``OptimConf`` from ``OptimConfig``'s fields (tuples become lists: OmegaConf has no tuples)."""
    from fp8train.train.module import OptimConfig

    hints = typing.get_type_hints(OptimConfig)
    fields = []
    for f in dataclasses.fields(OptimConfig):
        kind, default = hints[f.name], f.default
        if typing.get_origin(kind) is tuple:
            kind, default = List[float], list(default)
        fields.append((f.name, _omegaconf_type(kind) if kind in _PRIMITIVES else kind, _default_field(default)))
    return dataclasses.make_dataclass("OptimConf", fields)


#: ``optim:``: AdamW (``adamw``) or AdamW with fp8 states (``adamw_fp8``), linear warmup then cosine
#: decay; one field per ``fp8train.train.OptimConfig`` field (which validates the values).
OptimConf = _make_optim_conf()
OptimConf.__module__ = __name__


@dataclass
class PathsConf:
    """``paths:``: where a run writes (``output_dir`` is Hydra's run directory)."""

    output_dir: str = MISSING


@dataclass
class TrainConfig:
    """The whole run: one field per config group plus run-level settings.

    Attributes:
        seed: seeds Python, NumPy and torch on every rank (``lightning.seed_everything``).
        ckpt_path: a checkpoint to resume from (``"last"`` for this run dir's last one).
        callbacks: ``name -> {_target_: ...}`` Lightning callbacks (``~callbacks.NAME`` drops one).
        logger: ``name -> {_target_: ...}`` Lightning loggers (the ``logger`` group).
        summary: print the run summary and write ``summary.json`` (rank zero).
    """

    model: ModelConf = field(default_factory=ModelConf)  # type: ignore[valid-type]
    data: DataConf = field(default_factory=DataConf)
    fp8: Fp8Conf = field(default_factory=Fp8Conf)  # type: ignore[valid-type]
    optim: OptimConf = field(default_factory=OptimConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)  # type: ignore[valid-type]
    logger: Dict[str, Any] = field(default_factory=dict)
    callbacks: Dict[str, Any] = field(default_factory=dict)
    paths: PathsConf = field(default_factory=PathsConf)
    seed: int = 0
    ckpt_path: Optional[str] = None
    summary: bool = True



def auto_precision(accelerator: Any = "auto") -> str:
    """``trainer.precision`` for ``${fp8train.auto_precision:...}``: ``bf16-mixed`` when the run
    will use a CUDA GPU, ``32-true`` otherwise (CPU autocast to bf16 is slower than fp32 on most
    CPUs, and fp8 on CPU is emulated in fp32 anyway)."""
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if gpu else "32-true"


def register_configs(recipes_dir: str | Path | None = None) -> None:
    """Register the schemas, the ``recipe`` group and the ``fp8train.*`` resolvers with Hydra.

    Call once before ``@hydra.main`` runs or ``hydra.compose`` is used (idempotent).

    Args:
        recipes_dir: a directory of ``# @package _global_`` experiment overlays, offered as the
            ``recipe`` config group (``+recipe=NAME``). ``None``: the repository's ``recipes/``.
    """
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    recipes = Path(recipes_dir) if recipes_dir is not None else Path(__file__).resolve().parents[2] / "recipes"
    if recipes.is_dir():
        # Hydra maps a config group to a directory of the same name under a search-path root, so
        # the top-level recipes/ directory cannot be the `recipe` group by search path alone; each
        # file is stored under that group instead (its defaults list with `override /...` works).
        for path in sorted(recipes.glob("*.yaml")):
            head = path.read_text().lstrip().splitlines()[:1]
            if head != ["# @package _global_"]:
                raise ValueError(
                    f"recipe {str(path)!r} must start with the line '# @package _global_' (a recipe is an "
                    f"overlay on the whole config, like lightning-hydra-template's experiments)"
                )
            cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
    if not OmegaConf.has_resolver("fp8train.auto_precision"):
        OmegaConf.register_new_resolver("fp8train.auto_precision", auto_precision)

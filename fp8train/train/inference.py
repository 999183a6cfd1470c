"""From a Lightning checkpoint of the Hydra app to an exported inference model, and back.

``scripts/export.py`` is the command line over these functions::

    model = load_float_model("runs/x/checkpoints/last.ckpt")          # a plain fp32 Llama
    tokens = sample_tokens("runs/x/checkpoints/last.ckpt")            # a validation batch of its data
    exported = export_model(model, "int8", skip=["lm_head"])          # fp8train.export.to_inference
    rows = layer_sqnr(model, exported, tokens)                        # per-layer SQNR vs the float model
    save_exported("model.int8.pt", exported, model.config)
    again = load_exported("model.int8.pt")                            # same outputs as `exported`

The checkpoint's ``hyper_parameters["model"]`` (``LlamaLightningModule``) gives the architecture;
its ``state_dict`` the weights, under the ``model.`` prefix. fp8 training state (delayed scaling's
``fp8_*`` buffers) is dropped: the float model is the trained high-precision weights, whichever
recipe trained them. The exported file holds the inference state_dict (packed weights, scales,
everything else unchanged) plus what is needed to rebuild the module tree.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Sequence

import torch
import torch.nn as nn

from fp8train.data.datamodule import TokenDataModule
from fp8train.export import WEIGHT_FORMATS, ExportReport, export_report, to_inference
from fp8train.models.llama import Llama, LlamaConfig

__all__ = [
    "EXPORT_FILE_VERSION",
    "LayerSQNR",
    "export_model",
    "layer_sqnr",
    "load_exported",
    "load_float_model",
    "sample_tokens",
    "save_exported",
    "sqnr_db",
    "state_dict_bytes",
]

#: version of the file ``save_exported`` writes.
EXPORT_FILE_VERSION = 1
_PREFIX = "model."
_FP8_STATE = re.compile(r"(?:^|\.)fp8_[a-z_]+$")  # Float8Linear's training-only buffers


def _load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {str(path)!r}: no such file (scripts/train.py writes "
                                f"<run dir>/checkpoints/last.ckpt)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in ckpt or "model" not in ckpt.get("hyper_parameters", {}):
        raise ValueError(
            f"checkpoint {str(path)!r} is not a LlamaLightningModule checkpoint of scripts/train.py: it lacks "
            f"'state_dict' or hyper_parameters['model'] (keys: {sorted(ckpt)})"
        )
    return ckpt


def load_float_model(path: str | os.PathLike) -> Llama:
    """The trained weights of a ``scripts/train.py`` checkpoint in a plain fp32 ``Llama`` (eval mode).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a checkpoint of the Hydra app, or its weights do not fit the architecture
            its hyperparameters describe (the message lists the keys).
    """
    ckpt = _load_checkpoint(path)
    config = LlamaConfig(**ckpt["hyper_parameters"]["model"])
    state = {k[len(_PREFIX):]: v for k, v in ckpt["state_dict"].items()
             if k.startswith(_PREFIX) and not _FP8_STATE.search(k)}
    model = Llama(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not fit Llama({config}): missing {missing}, "
                         f"unexpected {unexpected}")
    return model.float().eval()


def sample_tokens(path: str | os.PathLike, batch_size: int = 4, seq_len: int | None = None) -> torch.Tensor:
    """The first validation batch of the data the checkpoint was trained on, ``[batch_size, T]``
    int64 (``T``: the training ``seq_len`` unless given). The data module's hyperparameters are
    saved in the checkpoint; a token file must still be where it was."""
    ckpt = _load_checkpoint(path)
    data = ckpt.get("datamodule_hyper_parameters")
    if not data:
        raise ValueError(f"checkpoint {str(path)!r} has no datamodule_hyper_parameters; pass the tokens yourself")
    dm = TokenDataModule(
        source=data["source"], seq_len=seq_len or data["seq_len"], batch_size=batch_size,
        val_fraction=data["val_fraction"], vocab_size=data["vocab_size"], token_dtype=data["token_dtype"],
        val_batches=1, embedded_max_bytes=data["embedded_max_bytes"],
    )
    dm.prepare_data()
    dm.setup("fit")
    inputs, _ = next(iter(dm.val_dataloader()))
    return inputs


def _matches(pattern: str, fqn: str) -> bool:
    parts = fqn.split(".")
    return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def export_model(model: nn.Module, weight_format: str, skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """A deep copy of ``model`` with its linears replaced by ``fp8train.export`` inference layers.

    Args:
        model: the float model (left unchanged).
        weight_format: one of ``fp8train.export.WEIGHT_FORMATS`` (``fp8``, ``int8``, ``ternary``).
        skip: ``fnmatch`` patterns of linears to keep in high precision, matched against each
            linear's name or any dotted suffix of it (``"lm_head"``, ``"layers.*.attention.wq"``).

    Returns:
        The exported copy; ``fp8train.export.export_report(exported)`` says what was replaced.
    """
    skip = list(skip)
    return to_inference(copy.deepcopy(model), weight_format,
                        module_filter_fn=lambda mod, fqn: not any(_matches(p, fqn) for p in skip))


@dataclass(frozen=True)
class LayerSQNR:
    """SQNR (dB) of one exported linear's output against the float model's, on a sample batch.

    Attributes:
        name: the layer's name in the model.
        isolated: the exported layer fed the float model's input to that layer: its own
            quantization error only.
        in_model: the layer's output when the whole exported model runs: errors of earlier
            layers included.
    """

    name: str
    isolated: float
    in_model: float


def sqnr_db(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """``20 log10(|ref| / |actual - ref|)`` in dB (inf when they are equal)."""
    ref, actual = ref.detach().double(), actual.detach().double()
    noise = (actual - ref).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(ref.norm() / noise))


@torch.no_grad()
def layer_sqnr(model: nn.Module, exported: nn.Module, tokens: torch.Tensor) -> tuple[list[LayerSQNR], float]:
    """Per exported layer SQNR against ``model`` on ``tokens``, and the SQNR of the final outputs.

    Returns:
        ``(rows, output_sqnr)``: one ``LayerSQNR`` per exported layer, in model order, and the
        SQNR (dB) of ``exported(tokens)`` against ``model(tokens)``.
    """
    report = export_report(exported)
    if report is None:
        raise ValueError("layer_sqnr: `exported` was not made by fp8train.export.to_inference")
    names = set(report.exported)
    float_io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    exported_out: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if name in names:
            handles.append(mod.register_forward_hook(
                lambda m, args, out, name=name: float_io.__setitem__(name, (args[0], out))))
    for name, mod in exported.named_modules():
        if name in names:
            handles.append(mod.register_forward_hook(
                lambda m, args, out, name=name: exported_out.__setitem__(name, out)))
    try:
        ref = model(tokens)
        out = exported(tokens)
    finally:
        for h in handles:
            h.remove()
    layers = dict(exported.named_modules())
    rows = [LayerSQNR(name, sqnr_db(layers[name](float_io[name][0]), float_io[name][1]),
                      sqnr_db(exported_out[name], float_io[name][1]))
            for name in report.exported]
    return rows, sqnr_db(out, ref)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``model.state_dict()``'s tensors (a tied tensor once)."""
    seen: dict[int, int] = {}
    for t in model.state_dict().values():
        seen[t.untyped_storage().data_ptr() if t.numel() else id(t)] = t.nbytes
    return sum(seen.values())


def save_exported(path: str | os.PathLike, exported: nn.Module, config: LlamaConfig,
                  extra: dict[str, Any] | None = None) -> None:
    """Write an exported Llama: its state_dict plus what ``load_exported`` needs to rebuild it."""
    report: ExportReport | None = export_report(exported)
    if report is None:
        raise ValueError("save_exported: `exported` was not made by fp8train.export.to_inference")
    torch.save({
        "version": EXPORT_FILE_VERSION,
        "weight_format": report.weight_format,
        "model_config": dataclasses.asdict(config),
        "exported": list(report.exported),
        "skipped": dict(report.skipped),
        "state_dict": exported.state_dict(),
        **(extra or {}),
    }, path)


def load_exported(path: str | os.PathLike) -> Llama:
    """Rebuild an exported Llama from ``save_exported``'s file (eval mode, on CPU).

    The architecture is built, the same layers are swapped for inference layers, then the saved
    state_dict is loaded strictly.

    Raises:
        ValueError: not such a file, or one of another version.
    """
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("version") != EXPORT_FILE_VERSION:
        raise ValueError(f"{str(path)!r} is not an fp8train export file of version {EXPORT_FILE_VERSION}")
    if blob["weight_format"] not in WEIGHT_FORMATS:
        raise ValueError(f"{str(path)!r}: weight_format={blob['weight_format']!r} is unknown; valid: "
                         f"{list(WEIGHT_FORMATS)}")
    exported = set(blob["exported"])
    model = to_inference(Llama(LlamaConfig(**blob["model_config"])), blob["weight_format"],
                         module_filter_fn=lambda mod, fqn: fqn in exported)
    model.load_state_dict(blob["state_dict"])
    return model.eval()

"""Throughput accounting: training FLOPs per token, dense peak FLOP/s by GPU, and MFU.

    >>> cfg = LlamaConfig.from_name("llama_1b")
    >>> fpt = flops_per_token(cfg, seq_len=2048)
    >>> mfu(tokens_per_s=30_000, flops_per_token=fpt, peak=peak_flops("cuda", fp8=True))

MFU (model FLOPs utilisation) counts the FLOPs the model needs, not those the hardware ran:
activation-checkpoint recomputation is not counted, and the peak is the dense (no sparsity)
tensor-core rate of the precision the GEMMs run in.
"""

from __future__ import annotations

import torch

from fp8train.models.llama import LlamaConfig

__all__ = ["matmul_params", "flops_per_token", "peak_flops", "peak_flops_for_name", "mfu"]

# Dense tensor-core peaks in FLOP/s from NVIDIA's data sheets: (bf16, fp8). Checked in order, first
# substring of the device name that matches wins, so variants come before the plain name.
_PEAKS: list[tuple[str, float, float | None]] = [
    ("H100 PCIe", 756e12, 1513e12),
    ("H100 NVL", 835e12, 1671e12),
    ("H200 NVL", 835e12, 1671e12),
    ("GH200", 989e12, 1979e12),
    ("H200", 989e12, 1979e12),
    ("H100", 989e12, 1979e12),  # SXM5; its name carries no form factor ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12, None),  # no fp8 tensor cores
]


def matmul_params(cfg: LlamaConfig) -> int:
    """Number of weights that take part in a matmul: every ``nn.Linear`` of the blocks plus
    ``lm_head``. The embedding lookup and the norm weights are not counted."""
    assert cfg.n_kv_heads is not None  # set by LlamaConfig.__post_init__; narrows the type
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    attention = cfg.dim * q_out + 2 * cfg.dim * kv_out + q_out * cfg.dim  # wq, wk + wv, wo
    feed_forward = 3 * cfg.dim * cfg.ffn_hidden_dim  # w1, w3, w2
    return cfg.n_layers * (attention + feed_forward) + cfg.dim * cfg.vocab_size


def flops_per_token(cfg: LlamaConfig, seq_len: int, causal_halved: bool = False) -> float:
    """Training (forward + backward) FLOPs per token.

    ``6 * matmul_params(cfg) + 12 * n_layers * n_heads * head_dim * seq_len``

    The first term is 2 FLOPs per multiply-add in forward and twice that in backward (grad_input
    and grad_weight) for every Linear, ``lm_head`` included. The second is attention's two
    sequence-length GEMMs (``Q K^T`` and ``P V``): ``2 * 2 * D * T`` per token per layer forward,
    times 3 for forward + backward. By default the full ``T x T`` score matrix is counted, as in
    PaLM's MFU definition (and torchtitan, nanoGPT); ``causal_halved=True`` counts only the
    unmasked half (``6 * ...``), the work a causal flash kernel actually does.

    Args:
        cfg: model shape.
        seq_len: training sequence length ``T`` (tokens).
        causal_halved: halve the attention term.

    Returns:
        FLOPs per token (a float): llama_1b at T=2048 gives 7.65e9, llama3_8b at T=8192 5.79e10.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"flops_per_token: seq_len={seq_len!r} is invalid; valid: an integer >= 1")
    attention_dim = cfg.n_heads * cfg.head_dim
    attention = 12 * cfg.n_layers * attention_dim * seq_len
    if causal_halved:
        attention //= 2
    return float(6 * matmul_params(cfg) + attention)


def peak_flops_for_name(name: str, fp8: bool) -> float | None:
    """Dense peak FLOP/s of the GPU called ``name`` (as ``torch.cuda.get_device_name`` spells it).

    Args:
        name: device name, e.g. ``"NVIDIA H100 80GB HBM3"``.
        fp8: the fp8 peak instead of bf16. A GPU without fp8 tensor cores (A100) gives its bf16
            peak: fp8 training there runs its GEMMs in bf16 (emulated), so that is the ceiling.

    Returns:
        FLOP/s, or ``None`` for a GPU not in the table (then no MFU is reported).
    """
    for key, bf16, f8 in _PEAKS:
        if key.lower() in name.lower():
            return f8 if (fp8 and f8 is not None) else bf16
    return None


def peak_flops(device: torch.device | str, fp8: bool) -> float | None:
    """Dense peak FLOP/s of ``device``: ``None`` for a CPU, or a GPU not in the table.

    Args:
        device: e.g. ``"cuda"``, ``"cuda:1"``, ``torch.device("cpu")``.
        fp8: the fp8 tensor-core peak instead of bf16 (see :func:`peak_flops_for_name`).

    Example:
        >>> peak_flops("cuda", fp8=True)   # on an H100 SXM
        1.979e+15
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device), fp8)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: ``tokens_per_s * flops_per_token / peak`` (a fraction, not %).

    Args:
        tokens_per_s: training throughput of the device ``peak`` describes (per GPU, not global).
        flops_per_token: from :func:`flops_per_token`.
        peak: from :func:`peak_flops`; ``None`` gives ``None``.
    """
    if peak is None:
        return None
    for name, value in (("tokens_per_s", tokens_per_s), ("flops_per_token", flops_per_token)):
        if not value >= 0:
            raise ValueError(f"mfu: {name}={value!r} is invalid; valid: a number >= 0")
    if not peak > 0:
        raise ValueError(f"mfu: peak={peak!r} is invalid; valid: a number > 0 or None")
    return tokens_per_s * flops_per_token / peak

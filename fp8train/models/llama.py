"""A Llama-style decoder-only transformer: RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU feed-forward.

The model knows nothing of fp8 or of parallelism. Every projection is a plain ``nn.Linear``
without bias, so transforms applied afterwards (fp8 module swap, tensor parallel, FSDP) find them
by name::

    layers.{i}.attention.wq / wk / wv / wo   (fuse_projections: wqkv / wo)
    layers.{i}.feed_forward.w1 / w2 / w3     (fuse_projections: w13 / w2)
    lm_head

Shapes used below: ``B`` batch, ``T`` sequence length, ``D`` model dim, ``H`` query heads,
``Hkv`` key/value heads, ``Dh = D // H`` head dim, ``F`` feed-forward hidden dim, ``V`` vocab.

    >>> cfg = LlamaConfig.from_name("llama_tiny")
    >>> model = Llama(cfg)
    >>> logits = model(torch.randint(0, cfg.vocab_size, (2, 16)))   # [2, 16, 256]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "LlamaConfig",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "Attention",
    "FeedForward",
    "TransformerBlock",
    "Llama",
]


def _fail(name: str, value: Any, valid: str) -> None:
    raise ValueError(f"LlamaConfig.{name}={value!r} is invalid; valid: {valid}")


def _check_pos_int(name: str, value: Any) -> None:
    # bool is an int subclass; True as a layer count is a bug, not a 1
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(name, value, "an integer >= 1")


def _check_pos_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        _fail(name, value, "a finite number > 0")


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and initialisation of a :class:`Llama` model.

    Args:
        dim: model (residual stream) width ``D``.
        n_layers: number of transformer blocks.
        n_heads: query heads ``H``; ``dim`` must divide into them with an even head dim (RoPE
            rotates pairs of channels).
        n_kv_heads: key/value heads ``Hkv`` for grouped-query attention; ``None`` means ``n_heads``
            (plain multi-head attention). ``n_heads`` must be a multiple of it.
        vocab_size: number of token ids ``V``.
        ffn_hidden_dim: SwiGLU hidden width ``F``.
        max_seq_len: longest sequence the rotary tables cover.
        rope_theta: rotary base frequency.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: share one ``[V, D]`` matrix between ``tok_embeddings`` and ``lm_head``.
        activation_checkpointing: recompute each block in backward instead of storing its
            activations (training mode only).
        init_std: standard deviation of the normal weight init; the two projections that write
            into the residual stream (``wo``, ``w2``) use ``init_std / sqrt(2 * n_layers)``.
        fuse_projections: one ``wqkv`` linear for the query, key and value projections and one
            ``w13`` for the SwiGLU gate and up projections: the same model with fewer, wider GEMMs
            (for fp8: the block input cast once per GEMM instead of three times, and layers wide
            enough for the auto filter to convert). Changes the parameter names (checkpoints of
            the unfused model do not load).

    Raises:
        ValueError: naming the field, its value and what is valid.

    Change a config with ``dataclasses.replace`` or ``LlamaConfig.from_name(name, **overrides)``.
    """

    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    vocab_size: int = 256
    ffn_hidden_dim: int = 384
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    activation_checkpointing: bool = False
    init_std: float = 0.02
    fuse_projections: bool = False

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "ffn_hidden_dim", "max_seq_len"):
            _check_pos_int(name, getattr(self, name))
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        _check_pos_int("n_kv_heads", self.n_kv_heads)
        for name in ("rope_theta", "norm_eps", "init_std"):
            _check_pos_float(name, getattr(self, name))
        for name in ("tie_embeddings", "activation_checkpointing", "fuse_projections"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")
        if self.dim % self.n_heads != 0:
            _fail("n_heads", self.n_heads, f"a divisor of dim={self.dim}")
        if (self.dim // self.n_heads) % 2 != 0:
            _fail("n_heads", self.n_heads, f"a divisor of dim={self.dim} leaving an even head dim (RoPE rotates pairs)")
        if self.n_heads % self.n_kv_heads != 0:
            _fail("n_kv_heads", self.n_kv_heads, f"a divisor of n_heads={self.n_heads} (or None for n_heads)")

    @property
    def head_dim(self) -> int:
        """``Dh = dim // n_heads``."""
        return self.dim // self.n_heads

    @staticmethod
    def names() -> list[str]:
        """Names accepted by :meth:`from_name`."""
        return list(_PRESETS)

    @staticmethod
    def from_name(name: str, **overrides: Any) -> "LlamaConfig":
        """A named preset, optionally with fields replaced.

        Args:
            name: one of :meth:`names`.
            **overrides: fields to replace (``activation_checkpointing=True``, ``max_seq_len=512``).

        Raises:
            ValueError: unknown name (the message lists the known ones), or an invalid override.

        Example:
            >>> LlamaConfig.from_name("llama_1b", max_seq_len=4096).dim
            2048
        """
        if name not in _PRESETS:
            raise ValueError(f"unknown Llama preset {name!r}; known presets: {LlamaConfig.names()}")
        fields = {f.name for f in dataclasses.fields(LlamaConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"LlamaConfig has no field(s) {unknown}; fields: {sorted(fields)}")
        return dataclasses.replace(_PRESETS[name], **overrides)


# Every Linear's in/out features is a multiple of 16 in all presets: fp8 GEMMs (torch._scaled_mm)
# need that, and the model is meant to be converted.
_PRESETS: dict[str, LlamaConfig] = {
    # trains a few hundred steps on a 2-core CPU in a minute or two; byte-level vocab
    "llama_tiny": LlamaConfig(
        dim=128, n_layers=4, n_heads=4, vocab_size=256, ffn_hidden_dim=384, max_seq_len=128
    ),
    # 85M non-embedding + 2 x 25M (untied) embedding/lm_head parameters = 135M
    "llama_125m": LlamaConfig(
        dim=768, n_layers=12, n_heads=12, vocab_size=32768, ffn_hidden_dim=2048, max_seq_len=2048
    ),
    # the ~1.2B benchmark shape: 1.07B in blocks + 2 x 67M embedding/lm_head
    "llama_1b": LlamaConfig(
        dim=2048, n_layers=16, n_heads=16, vocab_size=32768, ffn_hidden_dim=8192, max_seq_len=2048
    ),
    # Llama 3 8B
    "llama3_8b": LlamaConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_hidden_dim=14336,
        max_seq_len=8192, rope_theta=500000.0,
    ),
}


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, computed in fp32 and returned in ``x``'s dtype.

    Args:
        dim: size of the normalised (last) dimension.
        eps: added to the mean square before the reciprocal square root.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., dim]`` -> ``[..., dim]``, same dtype."""
        # fp32 statistics: the mean square of bf16 activations loses too many bits
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight.type_as(x)


class RotaryEmbedding(nn.Module):
    """Precomputed rotary-embedding tables ``cos``, ``sin``: ``[max_seq_len, head_dim // 2]`` fp32.

    The tables are non-persistent buffers (derived from the config, never checkpointed). After
    building the model on the meta device, call :meth:`reset_parameters` (or ``Llama.init_weights``)
    to fill them.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        device = self.cos.device
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim)
        )
        angles = torch.outer(torch.arange(self.max_seq_len, device=device, dtype=torch.float32), inv_freq)
        with torch.no_grad():
            self.cos.copy_(angles.cos())
            self.sin.copy_(angles.sin())

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` for positions ``0 .. seq_len-1``, each ``[seq_len, head_dim // 2]``."""
        return self.cos[:seq_len], self.sin[:seq_len]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(i, i + Dh/2)`` of ``x`` by position-dependent angles.

    Args:
        x: ``[B, T, heads, Dh]``.
        cos, sin: ``[T, Dh // 2]`` fp32.

    Returns:
        ``[B, T, heads, Dh]`` in ``x``'s dtype (rotation done in fp32).
    """
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).type_as(x)


class Attention(nn.Module):
    """Causal grouped-query self-attention through ``F.scaled_dot_product_attention``.

    ``wq: D -> H*Dh``, ``wk, wv: D -> Hkv*Dh``, ``wo: H*Dh -> D``. Each key/value head serves
    ``H // Hkv`` consecutive query heads. The forward takes its head counts from the projections'
    output widths, so it also runs on a tensor-parallel rank's local heads.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        assert cfg.n_kv_heads is not None  # set by LlamaConfig.__post_init__; narrows the type
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.qkv_dims = (q_dim, kv_dim, kv_dim)
        if cfg.fuse_projections:
            self.wqkv = nn.Linear(cfg.dim, q_dim + 2 * kv_dim, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, q_dim, bias=False)
            self.wk = nn.Linear(cfg.dim, kv_dim, bias=False)
            self.wv = nn.Linear(cfg.dim, kv_dim, bias=False)
        self.wo = nn.Linear(q_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, T, D]``; ``cos, sin``: ``[T, Dh // 2]`` -> ``[B, T, D]``."""
        B, T, _ = x.shape
        if hasattr(self, "wqkv"):
            q, k, v = self.wqkv(x).split(self.qkv_dims, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        # head counts from the projections' widths, not the config: under tensor parallelism each
        # rank holds H/tp query and Hkv/tp key/value heads (the ratio H/Hkv is unchanged)
        q = q.reshape(B, T, -1, self.head_dim)
        k = k.reshape(B, T, -1, self.head_dim)
        v = v.reshape(B, T, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        n_rep = self.n_heads // self.n_kv_heads
        if n_rep > 1:
            # expand + reshape rather than SDPA's enable_gqa: every SDPA backend (flash, cuDNN,
            # memory-efficient, math) accepts equal head counts
            kv_heads = k.shape[2]
            k = k[:, :, :, None, :].expand(B, T, kv_heads, n_rep, self.head_dim).reshape(B, T, -1, self.head_dim)
            v = v[:, :, :, None, :].expand(B, T, kv_heads, n_rep, self.head_dim).reshape(B, T, -1, self.head_dim)
        # SDPA wants [B, heads, T, Dh]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1(x)) * w3(x))`` with ``w1, w3: D -> F`` (gate, up), ``w2: F -> D``;
    ``fused``: one ``w13: D -> 2F`` (gate rows first, then up)."""

    def __init__(self, dim: int, hidden_dim: int, fused: bool = False) -> None:
        super().__init__()
        if fused:
            self.w13 = nn.Linear(dim, 2 * hidden_dim, bias=False)
            self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        else:  # registration order w1, w2, w3: named_modules() and checkpoints keep their order
            self.w1 = nn.Linear(dim, hidden_dim, bias=False)
            self.w2 = nn.Linear(hidden_dim, dim, bias=False)
            self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` -> ``[..., D]``."""
        if hasattr(self, "w13"):
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attention(norm(x))``; ``out = h + feed_forward(norm(h))``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden_dim, cfg.fuse_projections)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, T, D]`` -> ``[B, T, D]``."""
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """Llama decoder: token embedding, ``n_layers`` blocks, final RMSNorm, ``lm_head``.

    Args:
        config: the model shape; see :class:`LlamaConfig`.

    Example:
        >>> model = Llama(LlamaConfig.from_name("llama_tiny"))
        >>> tokens = torch.randint(0, 256, (4, 128))
        >>> loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())

    To build a large model without allocating it, construct under ``torch.device("meta")``, then
    ``model.to_empty(device=...)`` and ``model.init_weights()``.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"Llama(config=...) needs a LlamaConfig, got {type(config).__name__}")
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter and the rotary tables in place.

        Weights ~ ``N(0, init_std)``; ``wo`` and ``w2`` ~ ``N(0, init_std / sqrt(2 * n_layers))`` so
        the residual stream's variance does not grow with depth (GPT-2); norms = 1.
        """
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                is_residual_out = name.rsplit(".", 1)[-1] in ("wo", "w2")
                nn.init.normal_(mod.weight, std=out_std if is_residual_out else std)
            elif isinstance(mod, (RMSNorm, RotaryEmbedding)):
                mod.reset_parameters()
        # after lm_head: a tied matrix gets the embedding init (the same N(0, init_std))
        nn.init.normal_(self.tok_embeddings.weight, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits.

        Args:
            tokens: ``[B, T]`` int64 token ids in ``[0, vocab_size)``, ``T <= max_seq_len``.

        Returns:
            ``[B, T, vocab_size]`` logits (fp32, or the autocast dtype under autocast); position
            ``t`` depends on tokens ``0..t`` only.
        """
        if tokens.dim() != 2:
            raise ValueError(f"Llama.forward: tokens must be [batch, seq_len], got shape {tuple(tokens.shape)}")
        seq_len = tokens.shape[1]
        if seq_len > self.config.max_seq_len:
            raise ValueError(
                f"Llama.forward: seq_len={seq_len} exceeds max_seq_len={self.config.max_seq_len}; "
                "shorten the sequences or build the model with a larger max_seq_len"
            )
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope(seq_len)
        checkpointing = self.config.activation_checkpointing and self.training
        for layer in self.layers:
            if checkpointing:
                h = checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin)
        return self.lm_head(self.norm(h))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied matrix counts once).

        Args:
            exclude_embeddings: leave out the token-embedding table, which is a lookup, not a
                matmul. A table tied to ``lm_head`` stays in: it is also a matmul weight. The
                result is then the ``N`` of the ``6 N`` FLOPs-per-token rule (plus the norms).
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and not self.config.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

"""Does fp8 pay for a linear of this shape? A cost model of one Float8Linear training step.

For ``y = x @ W.T`` with ``x: [M, K]``, ``W: [N, K]`` (M tokens), one training step runs three
GEMMs of ``2·M·K·N`` flops each. In bf16 that costs ``6·M·K·N / bf16_flops``. In fp8 the GEMMs are
``gemm_speedup`` times faster, but every step also casts the activations and gradients
(``[M, K]`` and ``[M, N]``: amax, cast, transposed copy — memory bound, ``s_per_token_feature``
seconds per token per feature of ``K + N``), the weight (``s_per_weight_element`` per element of
``K·N``), and pays a fixed cost per layer (``s_fixed``: the extra kernel launches)::

    t_bf16 = 6·M·K·N / bf16_flops
    t_fp8  = t_bf16 / gemm_speedup + s_per_token_feature·M·(K + N) + s_per_weight_element·K·N + s_fixed

Because the cast cost grows with ``K + N`` and the GEMM saving with ``K·N``, small layers lose
(1024 x 1024 on an H100: ~0.7x) and large ones win (8192 x 8192: ~1.55x). The
``convert_to_float8_training`` auto filter keeps a layer in high precision when the predicted
speedup is below ``min_speedup``.

The constants are fitted to *lone* compiled layers, where every cast is a kernel of its own. Inside
a compiled model inductor fuses casts into their producers (RMSNorm, SwiGLU) and shares one input
cast between the layers that read the same tensor, so a layer gains more there than predicted:
the 2048 x 2048 attention projections of the 1.2B Llama (predicted 1.11x at 16384 tokens) made the
whole model 3.6% (tensorwise) and 4.9% (delayed) faster in fp8 than in bf16 (H200, 2026-11-29,
docs/PERF_NOTES.md entry 16). ``min_speedup`` (1.10) sits just under the lowest prediction
measured to pay that way; layers predicted below it are not known to gain.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["GemmCostModel", "H100", "for_current_device"]


@dataclass(frozen=True)
class GemmCostModel:
    """Measured constants of one GPU model (see the module docstring for the formula).

    Attributes:
        name: GPU the constants were measured on.
        bf16_flops: achieved dense bf16 GEMM throughput, flop/s.
        gemm_speedup: fp8 over bf16 GEMM throughput (same shapes).
        s_per_token_feature: cast cost of activations and gradients, seconds per token per feature.
        s_per_weight_element: cast cost of the weight, seconds per weight element.
        s_fixed: fixed cost per layer and step, seconds.
        tokens: tokens per step M assumed when the caller does not give one.
        min_speedup: the auto filter converts a layer only if its predicted speedup is at least this.
        tensor_parallel: ranks each linear is split over by tensor parallelism. Each rank runs the
            GEMMs of its shard; the prediction takes the larger of ``K`` and ``N`` as the split one
            (Megatron-style plans: column-wise up-projections ``K x N/tp``, row-wise
            down-projections ``K/tp x N``; square layers either way), since the style is not known
            when layers are converted (before tensor parallelism is applied).
    """

    name: str
    bf16_flops: float
    gemm_speedup: float
    s_per_token_feature: float
    s_per_weight_element: float
    s_fixed: float
    tokens: int = 16384
    min_speedup: float = 1.10
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.tensor_parallel, bool) or not isinstance(self.tensor_parallel, int) or self.tensor_parallel < 1:
            raise ValueError(f"GemmCostModel.tensor_parallel={self.tensor_parallel!r} is invalid; valid: an int >= 1")
        for f in ("bf16_flops", "gemm_speedup", "tokens", "min_speedup"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"GemmCostModel.{f}={v!r} is invalid; valid: a number > 0")
        for f in ("s_per_token_feature", "s_per_weight_element", "s_fixed"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"GemmCostModel.{f}={v!r} is invalid; valid: a number >= 0 (seconds)")

    def step_seconds(self, in_features: int, out_features: int, tokens: int | None = None) -> tuple[float, float]:
        """Predicted ``(bf16, fp8)`` seconds of one forward+backward of a ``K x N`` linear over ``tokens``."""
        m, k, n = tokens or self.tokens, in_features, out_features
        bf16 = 6.0 * m * k * n / self.bf16_flops
        fp8 = bf16 / self.gemm_speedup + self.s_per_token_feature * m * (k + n) + self.s_per_weight_element * k * n
        return bf16, fp8 + self.s_fixed

    def predicted_speedup(self, in_features: int, out_features: int, tokens: int | None = None) -> float:
        """bf16 time over fp8 time of one training step of a ``K x N`` linear (> 1: fp8 is faster);
        with ``tensor_parallel > 1``, of the shard one rank multiplies (its larger dimension split)."""
        k, n, tp = in_features, out_features, self.tensor_parallel
        if tp > 1:
            k, n = (k, n // tp) if n >= k else (k // tp, n)
        bf16, fp8 = self.step_seconds(k, n, tokens)
        return bf16 / fp8

    def skip_reason(self, in_features: int, out_features: int) -> str | None:
        """Why the auto filter keeps this layer in high precision, or ``None`` to convert it."""
        s = self.predicted_speedup(in_features, out_features)
        if s >= self.min_speedup:
            return None
        shard = f" split over {self.tensor_parallel} tensor-parallel ranks" if self.tensor_parallel > 1 else ""
        return (f"auto filter: predicted {s:.2f}x of bf16 for {in_features}x{out_features}{shard} at {self.tokens} "
                f"tokens on {self.name} (< {self.min_speedup:g}x); pass auto_filter=False to convert it anyway")

    def replace(self, **changes: object) -> "GemmCostModel":
        """A copy with some fields changed (e.g. ``tokens=batch * seq_len``)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


#: NVIDIA H100 80GB HBM3 (SXM), torch 2.11 + inductor, 2026-11-25 (docs/BENCHMARKS.md):
#: bf16 fwd+bwd of 4096x4096 and 8192x8192 at M = 16384 runs 7.1-7.2e14 flop/s; fp8 GEMMs alone
#: 1.66-2.0x (1.8 typical); the cast cost is fitted to the measured linear speedups of
#: 4096x4096 (1.36x), 4096x14336 (1.56x) and 8192x8192 (1.59x), rounded up (conservative).
#: Single-layer benchmarks of small layers measure less than predicted (2048x2048: 0.57x against
#: 1.11x) because one compiled layer is CPU-bound; in a whole compiled model they are not.
H100 = GemmCostModel(
    name="H100",
    bf16_flops=7.2e14,
    gemm_speedup=1.8,
    s_per_token_feature=2.5e-12,
    s_per_weight_element=2.0e-12,
    s_fixed=2.0e-5,
)


def for_current_device() -> GemmCostModel:
    """The cost model for this machine's GPU (the H100 model for any other GPU, as an estimate)."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "H100"
    if "H200" in name:  # same compute as the H100, more bandwidth: casts are a little cheaper
        return H100.replace(name="H200 (H100 constants)")
    return H100 if "H100" in name else H100.replace(name=f"{name} (H100 constants)")

"""Configuration of fp8 training: enums, frozen validated dataclasses, and named recipes.

Vocabulary used everywhere in fp8train:

* operands (``GemmInputRole``): ``input``, ``weight``, ``grad_output``
* GEMMs of one linear layer::

      output      = input       @ weight.T     [M,K] @ [K,N] -> [M,N]
      grad_input  = grad_output @ weight       [M,N] @ [N,K] -> [M,K]
      grad_weight = grad_output.T @ input      [N,M] @ [M,K] -> [N,K]

Every config is a frozen dataclass checked on construction; a bad value raises ``ValueError``
naming the field, the value and the valid choices. Change a config with ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fp8train.mx import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, STANDARD_BLOCK_SIZE

__all__ = [
    "ScalingType",
    "ScalingGranularity",
    "GemmInputRole",
    "CastConfig",
    "DelayedScalingConfig",
    "ScaledMMConfig",
    "LinearMMConfig",
    "Float8LinearConfig",
    "FP8_DTYPES",
    "CAST_KERNELS",
    "recipe_names",
]

#: fp8 element formats a cast may target, by the name used in configs and YAML.
FP8_DTYPES: dict[str, torch.dtype] = {
    "e4m3fn": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
}

#: values of ``Float8LinearConfig.cast_kernel``.
CAST_KERNELS: tuple[str, ...] = ("auto", "triton", "torch")


def _fail(owner: str, name: str, value: Any, valid: str) -> None:
    raise ValueError(f"{owner}.{name}={value!r} is invalid; valid: {valid}")


def _coerce_enum(owner: str, name: str, value: Any, enum_cls: type[enum.Enum]) -> enum.Enum:
    if isinstance(value, enum_cls):
        return value
    choices = [m.value for m in enum_cls]
    if isinstance(value, str) and value.lower() in choices:
        return enum_cls(value.lower())
    _fail(owner, name, value, f"one of {choices}")
    raise AssertionError("unreachable")


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(owner, name, value, "True or False")


class ScalingType(enum.Enum):
    """How an operand's scale is chosen.

    ``dynamic``: from the amax of the tensor being cast (one extra reduction per cast).
    ``delayed``: from an amax history recorded on earlier steps (the cast needs no reduction first).
    ``disabled``: the operand stays in high precision (its GEMM runs in high precision).
    """

    DYNAMIC = "dynamic"
    DELAYED = "delayed"
    DISABLED = "disabled"


class ScalingGranularity(enum.Enum):
    """``tensorwise``: one scale per tensor. ``axiswise``: one scale per row of the GEMM operand
    (the reduction runs along the GEMM's inner dimension), as ``torch._scaled_mm`` rowwise needs.
    ``mx``: OCP MX blocks: one power-of-two (E8M0) scale per ``block_size`` consecutive elements
    along the GEMM's inner dimension, from that block's own amax (``fp8train.mx``)."""

    TENSORWISE = "tensorwise"
    AXISWISE = "axiswise"
    MX = "mx"


class GemmInputRole(enum.Enum):
    """Which operand of a linear layer a tensor is."""

    INPUT = "input"
    WEIGHT = "weight"
    GRAD_OUTPUT = "grad_output"


@dataclass(frozen=True)
class CastConfig:
    """How one operand is cast to fp8.

    Args:
        scaling_type: dynamic, delayed or disabled (``ScalingType`` or its string value).
        scaling_granularity: tensorwise, axiswise or mx.
        target_dtype: ``"e4m3fn"`` / ``"e5m2"`` or the torch dtype. ``None`` picks e4m3fn. With
            ``mx`` granularity this is the MX element format (``fp8_e4m3`` / ``fp8_e5m2``).
        block_size: elements per MX block, only with ``scaling_granularity="mx"``: a power of two
            in [2, 256] (``None`` picks 32, the OCP standard and the only size MX hardware runs).
    """

    scaling_type: ScalingType = ScalingType.DYNAMIC
    scaling_granularity: ScalingGranularity = ScalingGranularity.TENSORWISE
    target_dtype: torch.dtype | str | None = None
    block_size: int | None = None

    def __post_init__(self) -> None:
        o = "CastConfig"
        object.__setattr__(self, "scaling_type", _coerce_enum(o, "scaling_type", self.scaling_type, ScalingType))
        object.__setattr__(
            self,
            "scaling_granularity",
            _coerce_enum(o, "scaling_granularity", self.scaling_granularity, ScalingGranularity),
        )
        dtype = self.target_dtype
        if dtype is None:
            dtype = torch.float8_e4m3fn
        elif isinstance(dtype, str):
            if dtype not in FP8_DTYPES:
                _fail(o, "target_dtype", dtype, f"one of {sorted(FP8_DTYPES)}")
            dtype = FP8_DTYPES[dtype]
        elif dtype not in FP8_DTYPES.values():
            _fail(o, "target_dtype", dtype, f"one of {sorted(FP8_DTYPES)}")
        object.__setattr__(self, "target_dtype", dtype)
        if self.scaling_type is ScalingType.DELAYED and self.scaling_granularity is ScalingGranularity.AXISWISE:
            raise ValueError(
                "CastConfig: scaling_type='delayed' with scaling_granularity='axiswise' is not supported "
                "(an amax history per row does not survive changing batch shapes); use 'tensorwise' "
                "with delayed scaling, or 'dynamic' with axiswise"
            )
        self._check_block_size(o)

    def _check_block_size(self, o: str) -> None:
        bs = self.block_size
        if self.scaling_granularity is not ScalingGranularity.MX:
            if bs is not None:
                _fail(o, "block_size", bs, f"None unless scaling_granularity='mx' (this cast is "
                      f"{self.scaling_granularity.value!r})")
            return
        if self.scaling_type is ScalingType.DELAYED:
            raise ValueError(
                "CastConfig: scaling_type='delayed' with scaling_granularity='mx' is not supported (an MX "
                "block's scale comes from that block's own amax); use scaling_type='dynamic'"
            )
        if bs is None:
            object.__setattr__(self, "block_size", STANDARD_BLOCK_SIZE)
        elif (isinstance(bs, bool) or not isinstance(bs, int) or not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE
              or bs & (bs - 1)):
            _fail(o, "block_size", bs, f"a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE} "
                  f"({STANDARD_BLOCK_SIZE} is the OCP standard and the only size MX hardware runs)")

    @property
    def enabled(self) -> bool:
        return self.scaling_type is not ScalingType.DISABLED

    @property
    def axiswise(self) -> bool:
        return self.scaling_granularity is ScalingGranularity.AXISWISE

    @property
    def mx(self) -> bool:
        """OCP MX block scaling (``scaling_granularity="mx"``)."""
        return self.enabled and self.scaling_granularity is ScalingGranularity.MX

    def __str__(self) -> str:
        if not self.enabled:
            return "hp"
        name = {v: k for k, v in FP8_DTYPES.items()}[self.target_dtype]
        granularity = f"mx{self.block_size}" if self.mx else self.scaling_granularity.value
        return f"{self.scaling_type.value}/{granularity}/{name}"


@dataclass(frozen=True)
class DelayedScalingConfig:
    """Settings of delayed scaling's amax history.

    Args:
        history_len: number of past amax values kept per operand (>= 1).
        amax_compute_algo: ``"max"`` (max over the history) or ``"most_recent"``.
        margin: scales are divided by ``2**margin`` for headroom (>= 0).
    """

    history_len: int = 16
    amax_compute_algo: str = "max"
    margin: float = 0.0

    def __post_init__(self) -> None:
        o = "DelayedScalingConfig"
        if isinstance(self.history_len, bool) or not isinstance(self.history_len, int) or self.history_len < 1:
            _fail(o, "history_len", self.history_len, "an int >= 1")
        if self.amax_compute_algo not in ("max", "most_recent"):
            _fail(o, "amax_compute_algo", self.amax_compute_algo, "'max' or 'most_recent'")
        if not isinstance(self.margin, (int, float)) or isinstance(self.margin, bool) or self.margin < 0:
            _fail(o, "margin", self.margin, "a number >= 0")


@dataclass(frozen=True)
class ScaledMMConfig:
    """How one GEMM runs.

    Args:
        emulate: dequantize the fp8 operands and multiply in high precision (any device).
        use_fast_accum: let ``torch._scaled_mm`` accumulate in reduced precision (faster on Hopper,
            less accurate; good for the forward GEMM, risky for gradients).
        fp8_output: round the GEMM's result through e4m3 (dynamic tensorwise scale) before it is
            returned in high precision. This models an fp8 wire format for the result to study its
            numerics; it does not make the GEMM faster.
        pad_inner_dim: zero-pad the GEMM's inner dimension to a multiple of 16 when it is not
            aligned (otherwise that GEMM falls back to an emulated high-precision matmul).
    """

    emulate: bool = False
    use_fast_accum: bool = False
    fp8_output: bool = False
    pad_inner_dim: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_bool("ScaledMMConfig", f.name, getattr(self, f.name))


@dataclass(frozen=True)
class LinearMMConfig:
    """One ``ScaledMMConfig`` per GEMM of a linear layer."""

    output: ScaledMMConfig = field(default_factory=lambda: ScaledMMConfig(use_fast_accum=True))
    grad_input: ScaledMMConfig = field(default_factory=ScaledMMConfig)
    grad_weight: ScaledMMConfig = field(default_factory=ScaledMMConfig)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not isinstance(getattr(self, f.name), ScaledMMConfig):
                _fail("LinearMMConfig", f.name, getattr(self, f.name), "a ScaledMMConfig")


def _as_cast(owner: str, name: str, value: Any, optional: bool) -> CastConfig | None:
    if value is None and optional:
        return None
    if isinstance(value, CastConfig):
        return value
    if isinstance(value, dict):
        return CastConfig(**value)
    _fail(owner, name, value, "a CastConfig" + (" or None" if optional else ""))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Float8LinearConfig:
    """Everything that decides how a ``Float8Linear`` casts and multiplies.

    Args:
        cast_config_input / cast_config_weight / cast_config_grad_output: cast of each operand.
        cast_config_input_for_grad_weight: cast of ``input`` in the grad_weight GEMM, when it
            differs from the forward one (``None``: same as ``cast_config_input``).
        cast_config_weight_for_grad_input: cast of ``weight`` in the grad_input GEMM.
        cast_config_grad_output_for_grad_weight: cast of ``grad_output`` in the grad_weight GEMM.
        gemm_config_output / gemm_config_grad_input / gemm_config_grad_weight: per-GEMM settings.
        emulate: force ``emulate=True`` on all three GEMMs.
        round_scales_to_power_of_2: round every scale down to a power of two (exact rescaling).
        enable_fsdp_float8_all_gather: cast weights to fp8 before FSDP2's all-gather.
        pad_inner_dim: force ``pad_inner_dim=True`` on all three GEMMs.
        delayed_scaling: history settings, used by operands with ``scaling_type='delayed'``.
        cast_kernel: who runs tensorwise casts on CUDA: ``"auto"`` (in eager mode the Triton
            kernel of ``fp8train.cast_kernel`` where it runs — NVIDIA compute capability 8.9+ with
            Triton — and torch ops under ``torch.compile``, where inductor fuses casts into their
            producers), ``"triton"`` (the kernel, also under compile: faster for a lone layer,
            slower and more memory in a whole compiled model; a forward on a device without it
            fails, naming this field) or ``"torch"`` (torch ops). For the same input tensor the fp8
            bytes are the same; under compile, inductor's casts may read a fused producer's fp32
            values where the kernel reads them rounded to the activation dtype (as eager does).

    Raises:
        ValueError: naming the field and the valid choices, e.g. when one GEMM would multiply an
            fp8 operand with a high-precision one, or delayed scaling is asked of the
            ``*_for_grad_*`` overrides (their amax is not tracked).

    Example:
        >>> cfg = Float8LinearConfig.from_recipe_name("delayed")
        >>> cfg.cast_config_grad_output.target_dtype
        torch.float8_e5m2
    """

    cast_config_input: CastConfig = field(default_factory=CastConfig)
    cast_config_weight: CastConfig = field(default_factory=CastConfig)
    cast_config_grad_output: CastConfig = field(default_factory=CastConfig)
    cast_config_input_for_grad_weight: CastConfig | None = None
    cast_config_weight_for_grad_input: CastConfig | None = None
    cast_config_grad_output_for_grad_weight: CastConfig | None = None
    gemm_config_output: ScaledMMConfig = field(default_factory=lambda: ScaledMMConfig(use_fast_accum=True))
    gemm_config_grad_input: ScaledMMConfig = field(default_factory=ScaledMMConfig)
    gemm_config_grad_weight: ScaledMMConfig = field(default_factory=ScaledMMConfig)
    emulate: bool = False
    round_scales_to_power_of_2: bool = False
    enable_fsdp_float8_all_gather: bool = False
    pad_inner_dim: bool = False
    delayed_scaling: DelayedScalingConfig = field(default_factory=DelayedScalingConfig)
    cast_kernel: str = "auto"

    def __post_init__(self) -> None:
        o = "Float8LinearConfig"
        if self.cast_kernel not in CAST_KERNELS:
            _fail(o, "cast_kernel", self.cast_kernel, f"one of {list(CAST_KERNELS)}")
        for name in ("cast_config_input", "cast_config_weight", "cast_config_grad_output"):
            object.__setattr__(self, name, _as_cast(o, name, getattr(self, name), optional=False))
        for name in (
            "cast_config_input_for_grad_weight",
            "cast_config_weight_for_grad_input",
            "cast_config_grad_output_for_grad_weight",
        ):
            cfg = _as_cast(o, name, getattr(self, name), optional=True)
            object.__setattr__(self, name, cfg)
            if cfg is not None and cfg.scaling_type is ScalingType.DELAYED:
                _fail(o, name, str(cfg), "a dynamic or disabled CastConfig (delayed state is kept only "
                      "for cast_config_input/weight/grad_output)")
        for name in ("gemm_config_output", "gemm_config_grad_input", "gemm_config_grad_weight"):
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, ScaledMMConfig(**getattr(self, name)))
            if not isinstance(getattr(self, name), ScaledMMConfig):
                _fail(o, name, getattr(self, name), "a ScaledMMConfig")
        for name in ("emulate", "round_scales_to_power_of_2", "enable_fsdp_float8_all_gather", "pad_inner_dim"):
            _check_bool(o, name, getattr(self, name))
        if isinstance(self.delayed_scaling, dict):
            object.__setattr__(self, "delayed_scaling", DelayedScalingConfig(**self.delayed_scaling))
        if not isinstance(self.delayed_scaling, DelayedScalingConfig):
            _fail(o, "delayed_scaling", self.delayed_scaling, "a DelayedScalingConfig")

        for gemm, (a_name, a), (b_name, b) in self.gemm_operands():
            if a.enabled != b.enabled:
                raise ValueError(
                    f"{o}: the {gemm} GEMM would multiply {a_name} ({a}) with {b_name} ({b}); both "
                    f"operands of one GEMM must be fp8 or both 'disabled'"
                )
            if a.mx != b.mx or (a.mx and a.block_size != b.block_size):
                raise ValueError(
                    f"{o}: the {gemm} GEMM would multiply {a_name} ({a}) with {b_name} ({b}); an MX "
                    f"operand needs an MX partner of the same block_size (scaling_granularity='mx' on both)"
                )
        if self.enable_fsdp_float8_all_gather and not self.cast_config_weight.enabled:
            _fail(o, "enable_fsdp_float8_all_gather", True, "False when cast_config_weight is 'disabled'")
        if self.enable_fsdp_float8_all_gather and (self.cast_config_weight.axiswise or self.cast_config_weight.mx):
            _fail(o, "enable_fsdp_float8_all_gather", True,
                  f"False unless the weight cast is tensorwise (fp8 all-gather supports tensorwise weights; "
                  f"this one is {self.cast_config_weight.scaling_granularity.value!r})")

    # --- derived views -------------------------------------------------------------------------
    @property
    def input_for_grad_weight(self) -> CastConfig:
        return self.cast_config_input_for_grad_weight or self.cast_config_input

    @property
    def weight_for_grad_input(self) -> CastConfig:
        return self.cast_config_weight_for_grad_input or self.cast_config_weight

    @property
    def grad_output_for_grad_weight(self) -> CastConfig:
        return self.cast_config_grad_output_for_grad_weight or self.cast_config_grad_output

    def gemm_operands(self) -> list[tuple[str, tuple[str, CastConfig], tuple[str, CastConfig]]]:
        """The two operand casts of each GEMM, in the order (gemm, left operand, right operand)."""
        return [
            ("output", ("input", self.cast_config_input), ("weight", self.cast_config_weight)),
            ("grad_input", ("grad_output", self.cast_config_grad_output),
             ("weight", self.weight_for_grad_input)),
            ("grad_weight", ("grad_output", self.grad_output_for_grad_weight),
             ("input", self.input_for_grad_weight)),
        ]

    @property
    def linear_mm_config(self) -> LinearMMConfig:
        """Per-GEMM configs with the global ``emulate`` / ``pad_inner_dim`` switches applied."""

        def merged(c: ScaledMMConfig) -> ScaledMMConfig:
            return dataclasses.replace(
                c, emulate=c.emulate or self.emulate, pad_inner_dim=c.pad_inner_dim or self.pad_inner_dim
            )

        return LinearMMConfig(
            merged(self.gemm_config_output), merged(self.gemm_config_grad_input), merged(self.gemm_config_grad_weight)
        )

    @property
    def has_mx(self) -> bool:
        """Whether any GEMM runs on MX operands (``fp8train.mx_ops``)."""
        return any(a.mx for _, (_, a), _ in self.gemm_operands())

    @property
    def has_tensorwise(self) -> bool:
        """Whether any fp8 cast is tensorwise (the casts ``cast_kernel`` applies to)."""
        casts = [c for _, (_, a), (_, b) in self.gemm_operands() for c in (a, b)]
        return any(c.enabled and not (c.axiswise or c.mx) for c in casts)

    @property
    def has_delayed(self) -> bool:
        return any(
            c.scaling_type is ScalingType.DELAYED
            for c in (self.cast_config_input, self.cast_config_weight, self.cast_config_grad_output)
        )

    @property
    def name(self) -> str:
        """The recipe name this config equals (whatever its ``cast_kernel``), or ``"custom"``."""
        for rname, make in _RECIPES.items():
            if dataclasses.replace(make(), cast_kernel=self.cast_kernel) == self:
                return rname
        return "custom"

    @staticmethod
    def from_recipe_name(name: str, **overrides: Any) -> "Float8LinearConfig":
        """Build a named recipe, optionally replacing fields (``emulate=True``, ...).

        Raises:
            ValueError: unknown name (the message lists the known ones) or a bad override.
        """
        if not isinstance(name, str) or name not in _RECIPES:
            raise ValueError(f"unknown fp8 recipe {name!r}; known recipes: {recipe_names()}")
        cfg = _RECIPES[name]()
        if overrides:
            known = {f.name for f in dataclasses.fields(Float8LinearConfig)}
            bad = sorted(set(overrides) - known)
            if bad:
                raise ValueError(f"Float8LinearConfig has no field(s) {bad}; fields: {sorted(known)}")
            cfg = dataclasses.replace(cfg, **overrides)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-able description (for checkpoints and logs)."""

        def conv(v: Any) -> Any:
            if isinstance(v, enum.Enum):
                return v.value
            if isinstance(v, torch.dtype):
                return {t: n for n, t in FP8_DTYPES.items()}[v]
            if dataclasses.is_dataclass(v):
                return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
            return v

        return conv(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Float8LinearConfig":
        return Float8LinearConfig(**d)


# --- recipes -------------------------------------------------------------------------------------
def _tensorwise() -> Float8LinearConfig:
    return Float8LinearConfig()


def _delayed() -> Float8LinearConfig:
    d = ScalingType.DELAYED
    return Float8LinearConfig(
        cast_config_input=CastConfig(d, target_dtype="e4m3fn"),
        cast_config_weight=CastConfig(d, target_dtype="e4m3fn"),
        cast_config_grad_output=CastConfig(d, target_dtype="e5m2"),
        delayed_scaling=DelayedScalingConfig(history_len=16, amax_compute_algo="max"),
    )


def _rowwise() -> Float8LinearConfig:
    row = CastConfig(ScalingType.DYNAMIC, ScalingGranularity.AXISWISE)
    return Float8LinearConfig(
        cast_config_input=row,
        cast_config_weight=row,
        cast_config_grad_output=row,
        # rowwise scaling on Hopper is slower with fast accumulation off; the scales absorb it
        gemm_config_output=ScaledMMConfig(use_fast_accum=True),
        round_scales_to_power_of_2=True,
    )


def _rowwise_with_gw_hp() -> Float8LinearConfig:
    row = CastConfig(ScalingType.DYNAMIC, ScalingGranularity.AXISWISE)
    hp = CastConfig(ScalingType.DISABLED)
    return Float8LinearConfig(
        cast_config_input=row,
        cast_config_weight=row,
        cast_config_grad_output=row,
        cast_config_input_for_grad_weight=hp,
        cast_config_grad_output_for_grad_weight=hp,
        round_scales_to_power_of_2=True,
    )


def _mxfp8() -> Float8LinearConfig:
    # e4m3 for gradients too: with one scale per 32 elements the block, not the format, covers the
    # dynamic range, so e4m3's extra mantissa bit wins (measured in tests/test_mx_linear.py)
    mx = CastConfig(ScalingType.DYNAMIC, ScalingGranularity.MX, "e4m3fn", block_size=STANDARD_BLOCK_SIZE)
    return Float8LinearConfig(cast_config_input=mx, cast_config_weight=mx, cast_config_grad_output=mx)


_RECIPES: dict[str, Callable[[], Float8LinearConfig]] = {
    "tensorwise": _tensorwise,
    "delayed": _delayed,
    "rowwise": _rowwise,
    "rowwise_with_gw_hp": _rowwise_with_gw_hp,
    "mxfp8": _mxfp8,
}


def recipe_names() -> list[str]:
    """Names accepted by ``Float8LinearConfig.from_recipe_name``."""
    return list(_RECIPES)

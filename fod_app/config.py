"""Hyperparameters and presets: the one place where FOD's settings are defined.

``FODConfig`` describes the model and its training; presets are named ``FODConfig`` factories.
Switches for the places where the authors' code deviates from the paper (spec §11) live here too,
each with its default documented in the README.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

#: Branch/score variants, as in paper Table 4 (ablation).
VARIANTS = ("full", "reconstruction", "intra", "inter")


@dataclass(frozen=True)
class FODConfig:
    """Everything that defines a FOD model and how it is trained.

    Attributes mirror the paper/official code; see README "Deviations from the paper".
    """

    backbone: str = "tf_efficientnet_lite0"
    image_size: int = 256
    d_models: tuple[int, ...] = (
        256,
        512,
    )  # one transformer per feature level (strides 8, 16)
    n_heads: int = 8
    n_layers: int = 3
    ffn_scale: int = 4
    # Training
    epochs: int = 100
    batch_size: int = 1
    learning_rate: float = 1e-4
    lambda_divergence: float = 0.5  # lambda_1
    lambda_entropy: float = 0.5  # lambda_2
    reconstruction_weight: float = 2.0  # official code counts L_rec twice (spec §5)
    eps: float = 1e-4  # inside every log (spec §5)
    # Query rows per level whose correlations enter the divergence/entropy losses each step
    # (a random subset, resampled every step; 0 = all rows, exact as in the official code).
    correlation_rows: int = 0
    # Standardise each feature channel with training-set statistics before the transformer (not in
    # the official code; makes the reconstruction target well scaled so short CPU budgets converge).
    normalize_features: bool = False
    seed: int = 3407
    # Variant (ablation): which branches are trained and scored.
    variant: str = "full"
    # Switches for the official code's deviations from the paper (spec §11).
    residual_cancellation: bool = True  # official: LN(Z_intra - Z_inter), the skip cancels
    use_out_projection: bool = False  # official: W_O computed and discarded
    score_weight: str = "one_minus_p"  # paper Eq. 12 "1 - p"; official code "max_minus_p" (see BENCHMARKS.md)
    zero_grad_quirk: bool = False  # official torch-1.13 behaviour: 2 Adam steps per image
    # Scoring
    smoothing_sigma: float = 4.0
    # Calibration
    holdout_fraction: float = 0.15
    min_holdout: int = 4
    threshold_quantile: float = 0.99
    preset: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.score_weight not in ("max_minus_p", "one_minus_p"):
            raise ValueError("score_weight must be 'max_minus_p' or 'one_minus_p'")
        for d in self.d_models:
            if d % self.n_heads or d % 4:
                raise ValueError(f"d_model {d} must be divisible by n_heads and by 4")
        if self.image_size % 16:
            raise ValueError("image_size must be a multiple of 16")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")

    @property
    def use_intra(self) -> bool:
        return self.variant in ("full", "intra")

    @property
    def use_inter(self) -> bool:
        return self.variant in ("full", "inter")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["d_models"] = list(self.d_models)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FODConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        data = dict(data)
        if "d_models" in data:
            data["d_models"] = tuple(int(d) for d in data["d_models"])
        return cls(**data)

    def with_overrides(self, **overrides: Any) -> FODConfig:
        """Copy with some fields changed (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def _paper() -> FODConfig:
    # The paper's hyperparameters (§4.1) with the official code's behaviour; backbone: the offline
    # EfficientNet-Lite0 instead of EfficientNet-b6 (which no offline package ships).
    return FODConfig(preset="paper")


def _cpu() -> FODConfig:
    # Designed for a 2-core CPU (see BENCHMARKS.md): same architecture, narrower (d 64/128, 2 heads,
    # 2 layers), batched training with a larger learning rate, standardised features, correlation
    # losses on 128 random query rows per step, and a fixed 10-epoch budget (no test-set selection).
    return FODConfig(
        preset="cpu",
        d_models=(64, 128),
        n_heads=2,
        n_layers=2,
        epochs=10,
        batch_size=8,
        learning_rate=2e-3,
        correlation_rows=128,
        normalize_features=True,
    )


def _quick() -> FODConfig:
    # For the demo and tests: the CPU preset with a short epoch budget.
    return replace(_cpu(), preset="quick", epochs=3)


PRESETS = {"cpu": _cpu, "paper": _paper, "quick": _quick}
DEFAULT_PRESET = "cpu"


def create_config(preset: str = DEFAULT_PRESET, **overrides: Any) -> FODConfig:
    """Build the config of a named preset, with optional field overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]().with_overrides(**overrides)

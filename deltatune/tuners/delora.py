"""DeLoRA: dW = (lambda / r) B diag(1 / (|a_i| |b_i|)) A diag(|W_:,j|), a LoRA update with a bounded norm.

Bini et al. 2025, "Decoupling Angles and Strength in Low-rank Adaptation",
https://arxiv.org/abs/2503.18225. Each rank-one term b_i a_i is normalised, so the update's strength
is the trained scalar lambda alone (its Frobenius norm is at most lambda times the base's column
norms), whatever A and B learn: the angle (A, B) and the strength (lambda) decouple.

    y = base(x) + ((x * w) A^T * s) B^T,   s_i = (lambda / r) / (|a_i| |b_i|),   w_j = |W[:, j]|

w (the base weight's column norms, (in,)) is read once when the adapter is created and saved with it
(peft's "delora_w_norm"), so a loaded adapter does not depend on the base it is loaded onto. B starts
at zero (identity at init); r (in + out) + 1 values per layer. `module_dropout` drops the update's
input. Layer kinds: Linear and GPT-2 Conv1D (peft: Linear only).

File layout is peft's: "<module>.delora_A" (r, in), "delora_B" (out, r), "delora_lambda" (1,),
"delora_w_norm" (in,).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.tuners.weight_delta import (
    CONTRACT_MODELS,
    DenseDelta,
    check_positive_int,
    check_probability,
    kaiming_,
    pattern_value,
)


@dataclass(kw_only=True)
class DeloraConfig(TunerConfig):
    """Configuration of a DeLoRA adapter (field names and meanings are peft's)."""

    tuner_name = "delora"
    peft_type = "DELORA"
    unsupported_peft_keys = {"bias": "none"}

    r: int = 8
    """Rank of the update."""
    delora_lambda: float = 15
    """Initial strength lambda (trained): bounds the update's norm."""
    module_dropout: float = 0.0
    """Dropout on the update's input only."""
    init_weights: bool = True
    """True: B = 0 (identity). False: random (tests only)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex on the name's tail: r}."""
    lambda_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module lambda overrides: {regex on the name's tail: lambda}."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        check_probability("module_dropout", self.module_dropout)
        if not isinstance(self.delora_lambda, (int, float)) or isinstance(self.delora_lambda, bool):
            raise ConfigError(f"delora_lambda must be a number, got {self.delora_lambda!r}")


class DeloraDelta(DenseDelta):
    def __init__(self, info: LayerInfo, *, r: int, strength: float, init: bool, dropout: float):
        super().__init__(info, dropout=dropout)
        self.r = r
        self.delora_A = nn.Parameter(kaiming_(torch.empty(r, info.in_features)))
        self.delora_B = nn.Parameter(
            torch.zeros(info.out_features, r) if init else kaiming_(torch.empty(info.out_features, r))
        )
        self.delora_lambda = nn.Parameter(torch.full((1,), float(strength)))
        self.register_buffer("delora_w_norm", torch.ones(info.in_features))  # (in,), saved with the adapter

    def init_from_base(self, read_weight, write_weight) -> None:
        """w = the base weight's column norms, read once at creation (a loaded adapter brings its own)."""
        with torch.no_grad():
            self.delora_w_norm.copy_(read_weight().float().norm(dim=0))

    def delta_weight(self) -> torch.Tensor:
        a, b = self.delora_A.float(), self.delora_B.float()
        norms = a.norm(dim=1).clamp_min(1e-4) * b.norm(dim=0).clamp_min(1e-4)  # (r,)
        scale = self.delora_lambda.float() / self.r / norms
        return (b * scale) @ a * self.delora_w_norm.float()  # (out, in)


def build(config: DeloraConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place DeloraConfig is read."""
    if info.kind != "linear":
        raise ConfigError(f"DeLoRA adapts linear layers only; {module_name!r} is a {info.kind} layer")
    r = int(pattern_value(config.rank_pattern, module_name, config.r))
    strength = float(pattern_value(config.lambda_pattern, module_name, config.delora_lambda))
    return DeloraDelta(info, r=r, strength=strength, init=config.init_weights, dropout=config.module_dropout)


SPEC = TunerSpec(
    name="delora",
    kind="delta",
    config=DeloraConfig,
    peft_type="DELORA",
    dispatch=("linear",),
    build=build,
    paper="https://arxiv.org/abs/2503.18225",
    contract_models=CONTRACT_MODELS,
    example_configs=({"r": 2, "delora_lambda": 3.0},),
)

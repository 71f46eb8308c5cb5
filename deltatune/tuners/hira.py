"""HiRA: dW = W0 ⊙ (B A), a low-rank matrix multiplied element-wise with the frozen weight itself.

Huang et al. 2025, "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language
Models", https://openreview.net/forum?id=TwJrTz9cRS. The Hadamard product with the full-rank W0
lifts the rank-r factor B A to a high-rank update at LoRA's cost, r (in + out) values per layer:

    y = base(x) + x (W0 ⊙ (B A))^T

B starts at zero (identity at init; A Kaiming-uniform, or N(0, 1/r) with init_weights="gaussian").
W0 is the base weight as it is when the update is applied; merging writes W0 (1 + B A) and keeps W0,
so unmerge restores it exactly (peft does the same). Layer kinds: Linear and GPT-2 Conv1D (peft also
adapts embeddings and convolutions; those are not implemented here).

File layout is peft's: "<module>.hira_A" (r, in) and "<module>.hira_B" (out, r).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.core.wrapper import BaseCall
from deltatune.tuners.weight_delta import (
    CONTRACT_MODELS,
    check_positive_int,
    check_probability,
    kaiming_,
    pattern_value,
)


@dataclass(kw_only=True)
class HiraConfig(TunerConfig):
    """Configuration of a HiRA adapter (field names and meanings are peft's)."""

    tuner_name = "hira"
    peft_type = "HIRA"

    r: int = 32
    """Rank of the factor B A multiplied into the weight."""
    hira_dropout: float = 0.0
    """Dropout on the update's input only."""
    fan_in_fan_out: bool = False
    """Kept for peft's files; GPT-2 Conv1D layers are read in the canonical (out, in) layout."""
    init_weights: bool | str = True
    """True: A Kaiming-uniform, B = 0; "gaussian": A ~ N(0, 1/r), B = 0; False: both N(0, 1) (tests only)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex on the name's tail: r}."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        check_probability("hira_dropout", self.hira_dropout)
        if self.init_weights not in (True, False, "gaussian"):
            raise ConfigError(f"init_weights must be True, False or 'gaussian', got {self.init_weights!r}")


class HiraDelta(nn.Module):
    def __init__(self, info: LayerInfo, *, r: int, init: bool | str, dropout: float):
        super().__init__()
        self.hira_A = nn.Parameter(torch.randn(r, info.in_features))
        self.hira_B = nn.Parameter(torch.randn(info.out_features, r))
        if init is True:
            kaiming_(self.hira_A.data)
        elif init == "gaussian":
            nn.init.normal_(self.hira_A, std=1 / r)
        if init is not False:
            nn.init.zeros_(self.hira_B)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _factor(self) -> torch.Tensor:
        return self.hira_B.float() @ self.hira_A.float()  # (out, in)

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        result = base(x)
        update = (base.weight().float() * self._factor()).to(x.dtype)  # (out, in)
        return result + F.linear(self.dropout(x), update).to(result.dtype)

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight * (1 + self._factor().to(weight)), bias, weight.clone()

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None, original: torch.Tensor):
        return original.to(weight), bias


def build(config: HiraConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place HiraConfig is read."""
    if info.kind != "linear":
        raise ConfigError(f"HiRA adapts linear layers here; {module_name!r} is a {info.kind} layer")
    r = int(pattern_value(config.rank_pattern, module_name, config.r))
    return HiraDelta(info, r=r, init=config.init_weights, dropout=config.hira_dropout)


SPEC = TunerSpec(
    name="hira",
    kind="delta",
    config=HiraConfig,
    peft_type="HIRA",
    dispatch=("linear",),
    build=build,
    paper="https://openreview.net/forum?id=TwJrTz9cRS",
    contract_models=CONTRACT_MODELS,
    example_configs=({"r": 2},),
)

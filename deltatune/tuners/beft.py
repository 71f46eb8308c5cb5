"""BEFT: y = base(x) + b, one trained bias vector per target layer (bias-efficient fine-tuning).

Huang et al. 2025, "BEFT: Bias-Efficient Fine-Tuning of Language Models",
https://arxiv.org/abs/2509.15974. Like BitFit but as a separate, per-adapter vector added to the
layer's output, so the base bias never changes, adapters switch, and layers without a bias can
be tuned too. b starts at zero (identity); out values per layer. Merging adds b to the base bias,
so it needs a layer that has one (a bias-less layer refuses the merge, as in peft).
Layer kinds: Linear and GPT-2 Conv1D.

File layout is peft's: "<module>.beft_bias", shaped (1, out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.core.wrapper import BaseCall, MergeError


@dataclass(kw_only=True)
class BeftConfig(TunerConfig):
    """Configuration of a BEFT adapter (field names and meanings are peft's)."""

    tuner_name = "beft"
    peft_type = "BEFT"
    sidecar_fields = frozenset({"exclude_modules", "layers_to_transform", "layers_pattern"})  # not in peft's BeftConfig

    init_weights: bool = True
    """True: b = 0 (identity). False: N(0, 1) (tests only)."""


class BeftDelta(nn.Module):
    def __init__(self, out: int, *, init: bool):
        super().__init__()
        self.beft_bias = nn.Parameter(torch.zeros(1, out) if init else torch.randn(1, out))

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        result = base(x)
        return result + self.beft_bias.flatten().to(result.dtype)  # (..., out)

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None):
        if bias is None:
            raise MergeError("BEFT adds to the layer's bias, and this layer has none; keep the adapter unmerged")
        return weight, bias + self.beft_bias.flatten().to(bias), None

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None, _ctx: object):
        return weight, bias - self.beft_bias.flatten().to(bias)


def build(config: BeftConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place BeftConfig is read."""
    if info.kind != "linear":
        raise ConfigError(f"BEFT adapts linear layers only; {module_name!r} is a {info.kind} layer")
    return BeftDelta(info.out_features, init=config.init_weights)


SPEC = TunerSpec(
    name="beft",
    kind="delta",
    config=BeftConfig,
    peft_type="BEFT",
    dispatch=("linear",),
    build=build,
    paper="https://arxiv.org/abs/2509.15974",
    contract_models=("conv", "gpt2"),  # merging needs layers with a bias (the tiny Llama has none)
    example_configs=({},),
)

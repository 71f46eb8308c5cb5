"""MiSS (formerly Bone): dW[o, i] = D[i mod r, o], one shared (r, out) block tiled along the input.

Kang and Yin 2024, "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing",
https://arxiv.org/abs/2409.15371. The input is cut into shards of r features and the shards are
summed, so one (r, out) matrix D updates the whole (out, in) weight:

    y = base(x) + (sum_g x[g r : (g + 1) r]) D        (the input zero-padded to a multiple of r)

D starts at zero (identity at init); r * out values per layer. `init_weights="mini"`: D is
(r, mini_r), tiled out / mini_r times along the output too (r * mini_r values). peft's third form,
"bat" (an update that multiplies blocks of the base weight), is not implemented and is refused.
Layer kinds: Linear and GPT-2 Conv1D (peft: Linear only).

File layout is peft's: "<module>.miss_block", (r, out) or (r, mini_r).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.tuners.weight_delta import (
    DENSE_CONTRACT_MODELS,
    DenseDelta,
    check_positive_int,
    check_probability,
    kaiming_,
)


@dataclass(kw_only=True)
class MissConfig(TunerConfig):
    """Configuration of a MiSS adapter (field names and meanings are peft's)."""

    tuner_name = "miss"
    peft_type = "MISS"
    unsupported_peft_keys = {"bias": "none"}

    r: int = 64
    """Shard size: the input is summed in groups of r features (lowered, with a warning, to the smallest
    target's in_features when larger)."""
    miss_dropout: float = 0.0
    """Dropout on the update's input only."""
    mini_r: int = 1
    """With init_weights="mini": the block's output width, tiled out / mini_r times."""
    init_weights: bool | str = True
    """True: D = 0 (identity); "mini": a (r, mini_r) block at zero; False: random (tests only)."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        check_positive_int("mini_r", self.mini_r)
        check_probability("miss_dropout", self.miss_dropout)
        if self.init_weights == "bat":
            raise ConfigError("MiSS init_weights='bat' is not supported by deltatune; use True or 'mini'")
        if self.init_weights not in (True, False, "mini"):
            raise ConfigError(f"init_weights must be True, False or 'mini', got {self.init_weights!r}")


class MissDelta(DenseDelta):
    def __init__(self, info: LayerInfo, *, r: int, mini_r: int | None, init: bool, dropout: float):
        super().__init__(info, dropout=dropout)
        self.miss_block = nn.Parameter(torch.zeros(r, mini_r or info.out_features))
        if not init:
            kaiming_(self.miss_block)

    def delta_weight(self) -> torch.Tensor:
        r, width = self.miss_block.shape
        out, fan_in = self.info.out_features, self.info.in_features
        block = self.miss_block.float().repeat(1, out // width)  # (r, out)
        return block.T.repeat(1, -(-fan_in // r))[:, :fan_in]  # (out, in): column i is row i mod r


def build(config: MissConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place MissConfig is read."""
    if info.kind != "linear":
        raise ConfigError(f"MiSS adapts linear layers only; {module_name!r} is a {info.kind} layer")
    if config.r > info.in_features:
        raise ConfigError(f"MiSS r={config.r} exceeds in_features={info.in_features} of {module_name!r}; lower r")
    mini = config.init_weights == "mini"
    if mini and info.out_features % config.mini_r:
        raise ConfigError(f"mini_r={config.mini_r} does not divide out_features={info.out_features} of {module_name!r}")
    return MissDelta(
        info, r=config.r, mini_r=config.mini_r if mini else None, init=config.init_weights is not False,
        dropout=config.miss_dropout,
    )  # fmt: skip


def prepare(model: nn.Module, config: MissConfig, targets: list[str]) -> MissConfig:
    """r above a target's input size (peft refuses it) is lowered to the smallest one, with a warning."""
    from deltatune.backends import describe

    modules = [model.get_submodule(name) for name in targets]
    sizes = [describe(getattr(m, "base_layer", m)).in_features for m in modules]
    if not sizes or config.r <= min(sizes):
        return config
    warnings.warn(f"MiSS r={config.r} exceeds the smallest target input size; using r={min(sizes)}", stacklevel=2)
    return config.replace(r=min(sizes))


SPEC = TunerSpec(
    name="miss",
    kind="delta",
    config=MissConfig,
    peft_type="MISS",
    dispatch=("linear",),
    build=build,
    prepare=prepare,
    paper="https://arxiv.org/abs/2409.15371",
    contract_models=DENSE_CONTRACT_MODELS,
    example_configs=({"r": 3},),
)

"""PEANuT: dW = s * g(W^T)^T, a small nonlinear network applied to the frozen weight itself.

Zhong et al. 2025, "PEANuT: Parameter-Efficient Adaptation with Weight-aware Neural Tweakers",
https://arxiv.org/abs/2410.01870. Where LoRA's update ignores W, PEANuT computes it from W: each row
of W^T (one input feature's weights, length out) passes through a bottleneck network,

    h = f(W^T A^T)  (in, r);  depth times: h = f(E_i h) (kept for a skip);  depth times: h = f(D_i h) + skip
    dW = s * (h B^T)^T  (out, in),      y = base(x) + x dW^T

with f = `act_fn` (transformers' names). B starts at zero (identity at init); r (2 out + 2 depth r)
values per layer. dW is a nonlinear function of W, so merging writes W0 + dW(W0) and keeps W0;
unmerge restores it exactly (peft does the same). Layer kinds: Linear and GPT-2 Conv1D.

File layout is peft's: "<module>.peanut_A.weight" (r, out), "peanut_B.weight" (out, r),
"peanut_encoders.<i>.weight" and "peanut_decoders.<i>.weight" (r, r).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.core.wrapper import BaseCall
from deltatune.tuners.weight_delta import CONTRACT_MODELS, check_positive_int, kaiming_


@dataclass(kw_only=True)
class PeanutConfig(TunerConfig):
    """Configuration of a PEANuT adapter (field names and meanings are peft's)."""

    tuner_name = "peanut"
    peft_type = "PEANUT"

    r: int = 32
    """Width of the bottleneck network."""
    depth: int = 0
    """Encoder/decoder pairs between A and B (0: just A and B)."""
    act_fn: str = "relu"
    """Activation f, by transformers' ACT2FN name ("relu", "gelu", "silu", ...)."""
    scaling: float = 1.0
    """s: the update's scale."""
    init_weights: bool = True
    """True: B = 0 (identity). False: random (tests only)."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        check_positive_int("depth", self.depth, allow_zero=True)
        from transformers.activations import ACT2FN

        if self.act_fn not in ACT2FN:
            raise ConfigError(f"act_fn={self.act_fn!r} is not a transformers activation; e.g. 'relu', 'gelu', 'silu'")


class PeanutDelta(nn.Module):
    def __init__(self, info: LayerInfo, *, r: int, depth: int, act: str, scaling: float, init: bool):
        super().__init__()
        from transformers.activations import ACT2FN

        out = info.out_features
        self.act, self.scaling = ACT2FN[act], scaling
        self.peanut_A = nn.Linear(out, r, bias=False)
        self.peanut_encoders = nn.ModuleList(nn.Linear(r, r, bias=False) for _ in range(depth))
        self.peanut_decoders = nn.ModuleList(nn.Linear(r, r, bias=False) for _ in range(depth))
        self.peanut_B = nn.Linear(r, out, bias=False)
        for layer in [self.peanut_A, *self.peanut_encoders, *self.peanut_decoders, self.peanut_B]:
            kaiming_(layer.weight.data)
        if init:
            nn.init.zeros_(self.peanut_B.weight)

    def delta_from(self, weight: torch.Tensor) -> torch.Tensor:
        """dW for base weight W (out, in), in W's dtype."""
        h = self.act(F.linear(weight.T, self.peanut_A.weight.to(weight)))  # (in, r)
        skips = []
        for encoder in self.peanut_encoders:
            skips.append(h)
            h = self.act(F.linear(h, encoder.weight.to(weight)))
        for decoder, skip in zip(self.peanut_decoders, reversed(skips)):
            h = self.act(F.linear(h, decoder.weight.to(weight))) + skip
        return (F.linear(h, self.peanut_B.weight.to(weight)) * self.scaling).T  # (out, in)

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        result = base(x)
        update = self.delta_from(base.weight().float()).to(x.dtype)
        return result + F.linear(x, update).to(result.dtype)

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight + self.delta_from(weight), bias, weight.clone()

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None, original: torch.Tensor):
        return original.to(weight), bias


def build(config: PeanutConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place PeanutConfig is read."""
    if info.kind != "linear":
        raise ConfigError(f"PEANuT adapts linear layers only; {module_name!r} is a {info.kind} layer")
    return PeanutDelta(
        info, r=config.r, depth=config.depth, act=config.act_fn, scaling=config.scaling, init=config.init_weights
    )


SPEC = TunerSpec(
    name="peanut",
    kind="delta",
    config=PeanutConfig,
    peft_type="PEANUT",
    dispatch=("linear",),
    build=build,
    paper="https://arxiv.org/abs/2410.01870",
    contract_models=CONTRACT_MODELS,
    example_configs=({"r": 4, "depth": 1, "act_fn": "gelu"},),
)

"""RoAd: y' = R y, R block-wise 2D rotations with scales acting on the layer's output features.

Liao et al. 2024, "2D Rotary Adaptation of Large Language Models", https://arxiv.org/abs/2409.00119.
The output features are split into groups of g (`group_size`); inside a group, feature k and feature
k + g/2 form a pair rotated by angle theta and scaled by alpha:

    (y_k, y_{k+g/2}) -> alpha (cos(theta) y_k - sin(theta) y_{k+g/2},  sin(theta) y_k + cos(theta) y_{k+g/2})

`variant` sets how many angles/scales train: "road_1" shares one (theta, alpha) per pair
(out / 2 each), "road_2" one per output feature (out), "road_4" separate cos/sin angles and scales
(2 out). theta starts at 0 and alpha at 1, so a fresh adapter is the identity. Merge W' = R W and
b' = R b; unmerge solves with R. Layer kinds: Linear and GPT-2 Conv1D (peft: Linear only).

File layout is peft's: "<module>.road_theta" and "<module>.road_alpha".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.core.wrapper import BaseCall
from deltatune.tuners.weight_delta import CONTRACT_MODELS, check_positive_int, common_divisor

_SIZE = {"road_1": 0.5, "road_2": 1, "road_4": 2}


@dataclass(kw_only=True)
class RoadConfig(TunerConfig):
    """Configuration of a RoAd adapter (field names and meanings are peft's)."""

    tuner_name = "road"
    peft_type = "ROAD"
    sidecar_fields = frozenset({"exclude_modules", "layers_to_transform", "layers_pattern"})  # not in peft's RoadConfig

    variant: str = "road_1"
    """"road_1" (out / 2 angles and scales), "road_2" (out), "road_4" (2 out)."""
    group_size: int = 64
    """Features per rotation group (even); lowered, with a warning, to a common divisor of the targets' outputs."""
    init_weights: bool = True
    """True: identity (theta 0, alpha 1). False: random (tests only)."""

    def validate(self) -> None:
        super().validate()
        if self.variant not in _SIZE:
            raise ConfigError(f"variant must be one of {sorted(_SIZE)}, got {self.variant!r}")
        check_positive_int("group_size", self.group_size)
        if self.group_size % 2:
            raise ConfigError(f"group_size must be even, got {self.group_size}")


class RoadDelta(nn.Module):
    """Rotates and scales the base output: y' = y * c1 + rotate_half(y) * c2 (per group)."""

    def __init__(self, out: int, *, variant: str, group: int, init: bool):
        super().__init__()
        self.variant, self.group = variant, group
        size = int(out * _SIZE[variant])
        self.road_theta = nn.Parameter(torch.zeros(size))
        self.road_alpha = nn.Parameter(torch.ones(size))
        if not init:
            nn.init.normal_(self.road_theta, std=0.5)
            nn.init.normal_(self.road_alpha, mean=1.0, std=0.5)

    def _columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(c1, c2), each (out,): the cos and sin coefficients of every output feature."""
        theta, alpha, half = self.road_theta, self.road_alpha, self.group // 2
        if self.variant == "road_1":  # one (theta, alpha) per pair: repeat each half-group twice
            theta = theta.reshape(-1, half).repeat_interleave(2, dim=0).flatten()
            alpha = alpha.reshape(-1, half).repeat_interleave(2, dim=0).flatten()
        if self.variant == "road_4":
            theta, alpha = theta.reshape(-1, 2, self.group), alpha.reshape(-1, 2, self.group)
            return alpha[:, 0].flatten() * theta[:, 0].cos().flatten(), alpha[:, 1].flatten() * theta[
                :, 1
            ].sin().flatten()
        return alpha * theta.cos(), alpha * theta.sin()

    def rotate(self, y: torch.Tensor) -> torch.Tensor:
        c1, c2 = (c.to(y.dtype) for c in self._columns())
        pairs = y.reshape(-1, 2, self.group // 2)  # (..., groups, 2, g/2) flattened
        half = torch.stack((-pairs[:, 1], pairs[:, 0]), dim=1).reshape(y.shape)
        return y * c1 + half * c2

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        return self.rotate(base(x))  # (..., out)

    def _matrix(self, like: torch.Tensor) -> torch.Tensor:
        """R with y' = R y: rotate() applied to the rows of I gives R^T."""
        eye = torch.eye(like.shape[0], device=like.device, dtype=torch.float32)
        return self.rotate(eye).T

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None):
        rot = self._matrix(weight).to(weight)
        return rot @ weight, (rot @ bias if bias is not None else None), None

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None, _ctx: object):
        rot = self._matrix(weight).to(weight)
        weight = torch.linalg.solve(rot, weight)
        return weight, (torch.linalg.solve(rot, bias) if bias is not None else None)


def build(config: RoadConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place RoadConfig is read."""
    if info.kind != "linear":
        raise ConfigError(f"RoAd adapts linear layers only; {module_name!r} is a {info.kind} layer")
    if info.out_features % config.group_size:
        raise ConfigError(
            f"RoAd group_size={config.group_size} must divide out_features={info.out_features} of {module_name!r}"
        )
    return RoadDelta(info.out_features, variant=config.variant, group=config.group_size, init=config.init_weights)


def prepare(model: nn.Module, config: RoadConfig, targets: list[str]) -> RoadConfig:
    """A group size that does not divide every target's output is lowered to their common divisor, with a warning."""
    group = common_divisor(model, targets, config.group_size, lambda info: (info.out_features,))
    if group == config.group_size or group % 2:
        return config  # unchanged, or no even common divisor: build() names the layer
    warnings.warn(f"RoAd group_size={config.group_size} does not divide every target; using {group}", stacklevel=2)
    return config.replace(group_size=group)


SPEC = TunerSpec(
    name="road",
    kind="delta",
    config=RoadConfig,
    peft_type="ROAD",
    dispatch=("linear",),
    build=build,
    prepare=prepare,
    paper="https://arxiv.org/abs/2409.00119",
    contract_models=CONTRACT_MODELS,
    example_configs=({"variant": "road_4", "group_size": 4},),  # road_1 / road_2: interop tests
)

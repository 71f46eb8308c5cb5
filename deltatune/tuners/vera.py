"""VeRA: dW = diag(b) B diag(d) A, with A, B random, frozen and shared by every layer; only b and d train.

Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation", https://arxiv.org/abs/2310.11454.
One pair of random projections A (r, in_max) and B (out_max, r) serves all adapted layers (each
uses the top-left slice it needs); per layer only the scaling vectors d (r) and b (out) train, so
r + out values per layer, ten times fewer than LoRA at equal quality in the paper:

    y = base(x) + b * (B[:out] (d * (A[:, :in] x)))

A and B are Kaiming-uniform from a CPU generator seeded with `projection_prng_key` (A drawn first,
then B, exactly as peft draws them), so they can be rebuilt instead of saved (`save_projection=False`).
b starts at zero and d at `d_initial`: a fresh adapter is the identity. Layer kinds: Linear and
GPT-2 Conv1D.

File layout is peft's: "<module>.vera_lambda_b" (out,), "<module>.vera_lambda_d" (r,), and, with
save_projection (the default), the shared projections once per adapter at model level:
"base_model.vera_A" (r, in_max) and "base_model.vera_B" (out_max, r).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError
from deltatune.core.registry import TunerSpec
from deltatune.tuners.weight_delta import (
    DENSE_CONTRACT_MODELS,
    DenseDelta,
    SharedProjectionConfig,
    check_positive_int,
    check_probability,
    model_level_keys,
    share_across_layers,
)


@dataclass(kw_only=True)
class VeraConfig(SharedProjectionConfig):
    """Configuration of a VeRA adapter (field names and meanings are peft's)."""

    tuner_name = "vera"
    peft_type = "VERA"
    unsupported_peft_keys = {"bias": "none"}
    sidecar_fields = frozenset({"exclude_modules"})  # not a VeraConfig field in peft

    r: int = 256
    """Rank of the shared projections (larger costs only r values per layer)."""
    vera_dropout: float = 0.0
    """Dropout on the update's input only."""
    d_initial: float = 0.1
    """Initial value of every entry of d."""
    fan_in_fan_out: bool = False
    """Kept for peft's files; GPT-2 Conv1D layers are read in the canonical (out, in) layout."""
    init_weights: bool = True
    """True: b = 0, d = d_initial (identity). False: b = 1, d ~ N(0, 1) (tests only)."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        check_probability("vera_dropout", self.vera_dropout)


def kaiming_projection(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """peft's _kaiming_init: uniform(+-sqrt(6 / fan_in)) drawn from `generator` (fan_in = shape[1])."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraDelta(DenseDelta):
    """Per-layer scaling vectors; `vera_A` / `vera_B` (shared tensors) are attached by `connect`."""

    def __init__(self, info: LayerInfo, *, r: int, d_initial: float, init: bool, dropout: float):
        super().__init__(info, dropout=dropout)
        self.vera_lambda_b = nn.Parameter(torch.zeros(info.out_features) if init else torch.ones(info.out_features))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial)) if init else torch.randn(r))

    def delta_weight(self) -> torch.Tensor:
        a = self.vera_A[:, : self.info.in_features].float()  # (r, in)
        b = self.vera_B[: self.info.out_features].float()  # (out, r)
        return (self.vera_lambda_b.float()[:, None] * b) @ (self.vera_lambda_d.float()[:, None] * a)  # (out, in)


def build(config: VeraConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place VeraConfig is read (with connect, which reads the seed)."""
    if info.kind != "linear":
        raise ConfigError(f"VeRA adapts linear layers only; {module_name!r} is a {info.kind} layer")
    return VeraDelta(
        info, r=config.r, d_initial=config.d_initial, init=config.init_weights, dropout=config.vera_dropout
    )


def connect(model: nn.Module, config: VeraConfig, adapter_name: str, targets: list[str]):
    """Draw A and B once, sized for the largest target, and give every layer of this adapter the same tensors."""
    infos = [model.get_submodule(name).deltas[adapter_name].info for name in targets]
    generator = torch.Generator().manual_seed(config.projection_prng_key)
    a = kaiming_projection((config.r, max(i.in_features for i in infos)), generator)  # A first, then B: peft's order
    b = kaiming_projection((max(i.out_features for i in infos), config.r), generator)
    share_across_layers(model, adapter_name, targets, {"vera_A": a, "vera_B": b}, persistent=config.save_projection)
    return lambda: None


SPEC = TunerSpec(
    name="vera",
    kind="delta",
    config=VeraConfig,
    peft_type="VERA",
    dispatch=("linear",),
    build=build,
    connect=connect,
    file_keys=model_level_keys("vera_A", "vera_B"),
    paper="https://arxiv.org/abs/2310.11454",
    contract_models=DENSE_CONTRACT_MODELS,
    example_configs=({"r": 4, "d_initial": 0.5},),  # save_projection=False: interop tests
)

"""RandLoRA: a full-rank update from many frozen random low-rank bases, each mixed by small trained factors.

Albert et al. 2025, "RandLoRA: Full-rank parameter-efficient fine-tuning of large models",
https://arxiv.org/abs/2502.00987. Where VeRA scales one random rank-r pair, RandLoRA sums
n = ceil(min(in, out) / r) random rank-r bases, so the update can reach full rank:

    dW = s * B_flat (Lambda * A * Gamma)_flat,      s = randlora_alpha / r
    A: (r, 1, min) and B: (max, n, r) shared, random, frozen;  Lambda: (r, n), Gamma: (n, min) trained

(`min`/`max` are the layer's smaller/larger dimension; A acts on the smaller side. The flattening
orders follow peft exactly: (r, n) for the A side, (n, r) for the B side.) A and B are drawn once
for the largest target, in bf16, Kaiming-uniform from a CPU generator seeded with
`projection_prng_key` and divided by their standard deviation (`sparse` / `very_sparse`: ternary
{-1, 0, 1} bases instead), as peft draws them; peft uses fp16 instead only on accelerators without
bf16. Lambda starts at zero (identity at init), Gamma at 1 / min. Layer kinds: Linear and GPT-2 Conv1D.

File layout is peft's: "<module>.randlora_lambda", "<module>.randlora_gamma", and with
save_projection (default) the shared bases at model level, "base_model.randlora_A" / "base_model.randlora_B",
and (as peft writes them) again under every target, "<module>.randlora_A" / "<module>.randlora_B".
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
class RandLoraConfig(SharedProjectionConfig):
    """Configuration of a RandLoRA adapter (field names and meanings are peft's)."""

    tuner_name = "randlora"
    peft_type = "RANDLORA"
    unsupported_peft_keys = {"bias": "none"}
    sidecar_fields = frozenset({"exclude_modules"})  # not a RandLoraConfig field in peft

    r: int = 32
    """Rank of each random basis; a layer uses ceil(min(in, out) / r) of them."""
    sparse: bool = False
    """Ternary bases with a third of the entries non-zero."""
    very_sparse: bool = False
    """Ternary bases with 1 / sqrt(min dimension) of the entries non-zero."""
    randlora_dropout: float = 0.0
    """Dropout on the update's input only."""
    fan_in_fan_out: bool = False
    """Kept for peft's files; GPT-2 Conv1D layers are read in the canonical (out, in) layout."""
    randlora_alpha: float = 640
    """Numerator of the scale randlora_alpha / r."""
    init_weights: bool = True
    """True: Lambda = 0 (identity). False: Lambda ~ N(0, 1) (tests only)."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        check_probability("randlora_dropout", self.randlora_dropout)


def random_bases(
    r: int, out_max: int, in_max: int, seed: int, sparsity: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's shared bases: A (r, 1, min_dim) and B (max_dim, n, r), bf16, normalised to unit std."""
    big, small = max(out_max, in_max), min(out_max, in_max)
    count = math.ceil(small / r)
    generator = torch.Generator().manual_seed(seed)
    if sparsity is None:
        a = nn.init.kaiming_uniform_(
            torch.empty(r, 1, small, dtype=torch.bfloat16), a=math.sqrt(5), generator=generator
        )
        parts = [torch.empty(big, 1, r, dtype=torch.bfloat16) for _ in range(count)]
        b = torch.cat([nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=generator) for p in parts], dim=1)
    else:  # ternary: -1 below 1/(2s), +1 above 1 - 1/(2s), else 0
        uniform_a = torch.rand((r, 1, small), generator=generator)
        uniform_b = torch.rand((big, count, r), generator=generator)
        a, b = ((u > 1 - 1 / (2 * sparsity)).float() - (u < 1 / (2 * sparsity)).float() for u in (uniform_a, uniform_b))
    return a / a.std(), b / b.std()


class RandLoraDelta(DenseDelta):
    """Per-layer mixing factors; `randlora_A` / `randlora_B` (shared tensors) are attached by `connect`."""

    def __init__(self, info: LayerInfo, *, r: int, scale: float, init: bool, dropout: float):
        super().__init__(info, dropout=dropout)
        self.r, self.scale = r, scale
        small, big = sorted((info.in_features, info.out_features))
        self.count = math.ceil(small / r)
        self.randlora_lambda = nn.Parameter(torch.zeros(r, self.count) if init else torch.randn(r, self.count))
        gamma = 1 / small if init else 1 / big
        self.randlora_gamma = nn.Parameter(torch.full((self.count, small), gamma))

    def delta_weight(self) -> torch.Tensor:
        fan_in, out = self.info.in_features, self.info.out_features
        small, big = min(fan_in, out), max(fan_in, out)
        a = self.randlora_A[:, : self.count, :small].float()  # (r, 1, small)
        b = self.randlora_B[:big, : self.count, :].float().flatten(start_dim=1)  # (big, n r)
        mixed = (self.randlora_lambda.float()[:, :, None] * a * self.randlora_gamma.float()[None]).flatten(end_dim=1)
        if small == fan_in:  # (r n, in) then (out, n r)
            return b @ mixed * self.scale
        return mixed.T @ b.T * self.scale  # (out, r n) @ (n r, in)


def build(config: RandLoraConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place RandLoraConfig is read (with connect, which reads the seed and sparsity)."""
    if info.kind != "linear":
        raise ConfigError(f"RandLoRA adapts linear layers only; {module_name!r} is a {info.kind} layer")
    return RandLoraDelta(
        info, r=config.r, scale=config.randlora_alpha / config.r, init=config.init_weights,
        dropout=config.randlora_dropout,
    )  # fmt: skip


def connect(model: nn.Module, config: RandLoraConfig, adapter_name: str, targets: list[str]):
    """Draw the bases once, sized for the largest target, and give every layer of this adapter the same tensors."""
    infos = [model.get_submodule(name).deltas[adapter_name].info for name in targets]
    out_max, in_max = max(i.out_features for i in infos), max(i.in_features for i in infos)
    sparsity = math.sqrt(min(out_max, in_max)) if config.very_sparse else 3 if config.sparse else None
    a, b = random_bases(config.r, out_max, in_max, config.projection_prng_key, sparsity)
    share_across_layers(
        model, adapter_name, targets, {"randlora_A": a, "randlora_B": b}, persistent=config.save_projection
    )
    return lambda: None


SPEC = TunerSpec(
    name="randlora",
    kind="delta",
    config=RandLoraConfig,
    peft_type="RANDLORA",
    dispatch=("linear",),
    build=build,
    connect=connect,
    file_keys=model_level_keys("randlora_A", "randlora_B", per_layer=True),
    paper="https://arxiv.org/abs/2502.00987",
    contract_models=DENSE_CONTRACT_MODELS,
    example_configs=({"r": 4, "randlora_alpha": 8},),  # sparse bases: interop tests
)

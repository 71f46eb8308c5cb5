"""PVeRA: VeRA with a probabilistic code: the rank-r code is sampled from a learned Gaussian while training.

Probabilistic VeRA, https://arxiv.org/abs/2512.07703. As in VeRA, random frozen projections A (2r, in_max) and B
(out_max, r) are shared by every layer and only scaling vectors train; the scaled projection gives a
mean and a log-variance, and training samples the code (the reparametrisation trick):

    (mu, logvar) = split(d * (A[:, :in] x)),   z = mu + eps * exp(logvar / 2)  (training; else z = mu)
    y = base(x) + b * (B[:out] z)               merged/eval:  dW = diag(b) B diag(d[:r]) A[:r]

b starts at zero and d at `d_initial`: a fresh adapter is the identity. `sample_at_inference` also
samples in eval mode (then the output is random and merging changes it: use it for uncertainty
estimates only); `generator_seed` seeds the noise. A and B are Kaiming-uniform from a CPU generator
seeded with `projection_prng_key` (A first), as peft draws them. Layer kinds: Linear and GPT-2 Conv1D.

File layout is peft's: "<module>.pvera_lambda_b" (out,), "<module>.pvera_lambda_d" (2r,), and with
save_projection (default) "base_model.pvera_A" / "base_model.pvera_B" once per adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError
from deltatune.core.registry import TunerSpec
from deltatune.core.wrapper import BaseCall
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
class PveraConfig(SharedProjectionConfig):
    """Configuration of a PVeRA adapter (field names and meanings are peft's)."""

    tuner_name = "pvera"
    peft_type = "PVERA"
    unsupported_peft_keys = {"bias": "none"}
    sidecar_fields = frozenset({"exclude_modules"})  # not a PveraConfig field in peft

    r: int = 256
    """Rank of the code (A has 2r rows: mean and log-variance)."""
    pvera_dropout: float = 0.0
    """Dropout on the update's input only."""
    d_initial: float = 0.1
    """Initial value of every entry of d."""
    fan_in_fan_out: bool = False
    """Kept for peft's files; GPT-2 Conv1D layers are read in the canonical (out, in) layout."""
    init_weights: bool = True
    """True: b = 0, d = d_initial (identity). False: b = 1, d ~ N(0, 1) (tests only)."""
    sample_at_inference: bool = False
    """Also sample the code in eval mode."""
    generator_seed: int | None = None
    """Seed of the sampling noise (None: torch's global generator)."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        check_probability("pvera_dropout", self.pvera_dropout)
        if self.generator_seed is not None:
            check_positive_int("generator_seed", self.generator_seed, allow_zero=True)


class PveraDelta(DenseDelta):
    """Per-layer scaling vectors; `pvera_A` / `pvera_B` (shared tensors) are attached by `connect`."""

    def __init__(self, info: LayerInfo, *, r: int, d_initial: float, init: bool, dropout: float, sample: bool,
                 seed: int | None):  # fmt: skip
        super().__init__(info, dropout=dropout)
        self.r, self.sample = r, sample
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.pvera_lambda_b = nn.Parameter(torch.zeros(info.out_features) if init else torch.ones(info.out_features))
        self.pvera_lambda_d = nn.Parameter(torch.full((2 * r,), float(d_initial)) if init else torch.randn(2 * r))

    def delta_weight(self) -> torch.Tensor:
        a = self.pvera_A[: self.r, : self.info.in_features].float()  # the mean half: (r, in)
        b = self.pvera_B[: self.info.out_features].float()  # (out, r)
        return (self.pvera_lambda_b.float()[:, None] * b) @ (self.pvera_lambda_d[: self.r].float()[:, None] * a)

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        if not (self.training or self.sample):
            return super().forward(x, base)
        result = base(x)
        a = self.pvera_A[:, : self.info.in_features].to(x.dtype)  # (2r, in)
        b = self.pvera_B[: self.info.out_features].to(x.dtype)  # (out, r)
        mu, logvar = (self.pvera_lambda_d.to(x.dtype) * F.linear(self.dropout(x), a)).chunk(2, dim=-1)  # (..., r) each
        std = torch.exp(0.5 * logvar)
        if self.generator is None:
            noise = torch.randn_like(std)
        else:
            noise = torch.randn(std.shape, dtype=std.dtype, generator=self.generator).to(std.device)
        code = mu + noise * std
        return result + (self.pvera_lambda_b.to(x.dtype) * F.linear(code, b)).to(result.dtype)


def build(config: PveraConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place PveraConfig is read (with connect, which reads the seed)."""
    if info.kind != "linear":
        raise ConfigError(f"PVeRA adapts linear layers only; {module_name!r} is a {info.kind} layer")
    return PveraDelta(
        info, r=config.r, d_initial=config.d_initial, init=config.init_weights, dropout=config.pvera_dropout,
        sample=config.sample_at_inference, seed=config.generator_seed,
    )  # fmt: skip


def connect(model: nn.Module, config: PveraConfig, adapter_name: str, targets: list[str]):
    """Draw A (2r, in_max) then B (out_max, r) once and give every layer of this adapter the same tensors."""
    infos = [model.get_submodule(name).deltas[adapter_name].info for name in targets]
    generator = torch.Generator().manual_seed(config.projection_prng_key)
    a = nn.init.kaiming_uniform_(torch.empty(2 * config.r, max(i.in_features for i in infos)), generator=generator)
    b = nn.init.kaiming_uniform_(torch.empty(max(i.out_features for i in infos), config.r), generator=generator)
    share_across_layers(model, adapter_name, targets, {"pvera_A": a, "pvera_B": b}, persistent=config.save_projection)
    return lambda: None


SPEC = TunerSpec(
    name="pvera",
    kind="delta",
    config=PveraConfig,
    peft_type="PVERA",
    dispatch=("linear",),
    build=build,
    connect=connect,
    file_keys=model_level_keys("pvera_A", "pvera_B"),
    paper="https://arxiv.org/abs/2512.07703",
    contract_models=DENSE_CONTRACT_MODELS,
    example_configs=({"r": 4, "d_initial": 0.5},),
)

"""VB-LoRA: LoRA factors assembled from a vector bank shared by every layer; each sub-vector mixes its top-k bank vectors.

Li et al. 2024, "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks",
https://arxiv.org/abs/2405.15179. A and B are cut into sub-vectors of length L; each is a softmax
mix of the k bank vectors its logits rank highest. The bank (N, L) is trained and shared by all
adapted layers, so only the logits are per layer:

    A[i, block] = sum_top-k softmax(a_i,block) * bank[idx],   B likewise,   dW = B A   (no scale)

A: (r, in) from logits (r, in / L, N), B: (out, r) from logits (out / L, r, N). The logits start
N(0, `init_logits_std`) and the bank uniform(+-`init_vector_bank_bound`), so a fresh adapter is
*not* the identity (as in peft). L must divide in and out. Layer kinds: Linear and GPT-2 Conv1D.
peft's `save_only_topk_weights` file form (top-k indices and weights instead of logits) is not
read or written; such files are refused with a message.

File layout is peft's: "<module>.vblora_logits_A", "<module>.vblora_logits_B", and the bank once per
adapter at model level, "base_model.vblora_vector_bank".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.tuners.weight_delta import (
    DENSE_CONTRACT_MODELS,
    DenseDelta,
    check_positive_int,
    check_probability,
    common_divisor,
    model_level_keys,
)


@dataclass(kw_only=True)
class VBLoRAConfig(TunerConfig):
    """Configuration of a VB-LoRA adapter (field names and meanings are peft's)."""

    tuner_name = "vblora"
    peft_type = "VBLORA"
    unsupported_peft_keys = {"bias": "none", "save_only_topk_weights": False}

    r: int = 4
    """Rank of A and B."""
    num_vectors: int = 256
    """Vectors N in the shared bank."""
    vector_length: int = 256
    """Length L of each bank vector; lowered, with a warning, to a common divisor of the targets' in and out."""
    topk: int = 2
    """Bank vectors mixed into each sub-vector."""
    vblora_dropout: float = 0.0
    """Dropout on the update's input only."""
    fan_in_fan_out: bool = False
    """Kept for peft's files; GPT-2 Conv1D layers are read in the canonical (out, in) layout."""
    init_vector_bank_bound: float = 0.02
    """The bank starts uniform in [-bound, bound]."""
    init_logits_std: float = 0.1
    """The logits start N(0, std)."""

    def validate(self) -> None:
        super().validate()
        for name in ("r", "num_vectors", "vector_length", "topk"):
            check_positive_int(name, getattr(self, name))
        check_probability("vblora_dropout", self.vblora_dropout)
        if self.topk > self.num_vectors:
            raise ConfigError(f"topk={self.topk} exceeds num_vectors={self.num_vectors}")


def mix(logits: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """(..., N) logits -> (..., L): softmax over the top-k logits, weighting their bank vectors."""
    top, index = logits.topk(k, dim=-1)
    return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[index]).sum(-2)


class VBLoRADelta(DenseDelta):
    """Per-layer logits; `vblora_vector_bank` (one shared parameter) is attached by `connect`."""

    def __init__(self, info: LayerInfo, *, r: int, vectors: int, length: int, k: int, std: float, dropout: float):
        super().__init__(info, dropout=dropout)
        self.k = k
        self.vblora_logits_A = nn.Parameter(torch.randn(r, info.in_features // length, vectors) * std)
        self.vblora_logits_B = nn.Parameter(torch.randn(info.out_features // length, r, vectors) * std)

    def delta_weight(self) -> torch.Tensor:
        bank = self.vblora_vector_bank.float()
        logits_a, logits_b = self.vblora_logits_A.float(), self.vblora_logits_B.float()
        a = mix(logits_a, bank, self.k).reshape(logits_a.shape[0], -1)  # (r, in)
        b = mix(logits_b, bank, self.k).transpose(1, 2).reshape(-1, logits_b.shape[1])  # (out, r)
        return b @ a


def build(config: VBLoRAConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place VBLoRAConfig is read (with connect, which sizes the bank)."""
    if info.kind != "linear":
        raise ConfigError(f"VB-LoRA adapts linear layers only; {module_name!r} is a {info.kind} layer")
    length = config.vector_length
    if info.in_features % length or info.out_features % length:
        raise ConfigError(
            f"vector_length={length} must divide in_features={info.in_features} and out_features={info.out_features} "
            f"of {module_name!r}; pick a common divisor"
        )
    return VBLoRADelta(
        info, r=config.r, vectors=config.num_vectors, length=length, k=config.topk, std=config.init_logits_std,
        dropout=config.vblora_dropout,
    )  # fmt: skip


def prepare(model: nn.Module, config: VBLoRAConfig, targets: list[str]) -> VBLoRAConfig:
    """A vector length that does not divide every target is lowered to their common divisor, with a warning."""
    length = common_divisor(model, targets, config.vector_length, lambda info: (info.in_features, info.out_features))
    if length == config.vector_length:
        return config
    warnings.warn(
        f"VB-LoRA vector_length={config.vector_length} does not divide every target; using {length}", stacklevel=2
    )
    return config.replace(vector_length=length)


def connect(model: nn.Module, config: VBLoRAConfig, adapter_name: str, targets: list[str]):
    """One trained bank for all layers of this adapter: the same Parameter registered in every delta."""
    deltas = [model.get_submodule(name).deltas[adapter_name] for name in targets]
    bound = config.init_vector_bank_bound
    device = deltas[0].vblora_logits_A.device
    bank = nn.Parameter(torch.empty(config.num_vectors, config.vector_length, device=device).uniform_(-bound, bound))
    for delta in deltas:
        delta.vblora_vector_bank = bank
    return lambda: None


SPEC = TunerSpec(
    name="vblora",
    kind="delta",
    config=VBLoRAConfig,
    peft_type="VBLORA",
    dispatch=("linear",),
    build=build,
    prepare=prepare,
    connect=connect,
    file_keys=model_level_keys("vblora_vector_bank"),
    paper="https://arxiv.org/abs/2405.15179",
    identity_at_init=False,  # random logits mix a random bank, as in peft
    contract_models=DENSE_CONTRACT_MODELS,
    example_configs=({"r": 2, "num_vectors": 8, "vector_length": 2, "topk": 2},),
)

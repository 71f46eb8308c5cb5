"""GraLoRA: LoRA split into a k x k grid of small low-rank blocks, dW = s [B_j A_(n, j)]_(j, n) (+ s B_h A_h).

Jung et al. 2025, "GraLoRA: Granular Low-Rank Adaptation", https://arxiv.org/abs/2505.20355. The
weight is cut into k x k blocks (out/k x in/k); block (j, n) gets its own rank-r/k product, so the
update reaches rank up to k r with LoRA's r (in + out) values, and a large gradient in one input
channel no longer spreads over the whole update (the paper's argument against plain LoRA at high r).

    A: (k, in/k, r), B: (k, r, out/k);   block (j, n) of dW = s * B[j, n r/k : (n+1) r/k]^T A[n, :, j r/k : (j+1) r/k]^T
    s = alpha / (r + hybrid_r)

`hybrid_r` adds a plain LoRA of that rank over the whole weight (`gralora_A_general`,
`gralora_B_general`). B (and the hybrid B) start at zero: identity at init. Layer kinds: Linear and
GPT-2 Conv1D. r must be divisible by k, and k must divide in and out.

File layout is peft's: "<module>.gralora_A" (k, in/k, r), "<module>.gralora_B" (k, r, out/k), and
"<module>.gralora_A_general.weight" / "gralora_B_general.weight" with hybrid_r.
"""

from __future__ import annotations

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
class GraloraConfig(TunerConfig):
    """Configuration of a GraLoRA adapter (field names and meanings are peft's)."""

    tuner_name = "gralora"
    peft_type = "GRALORA"
    sidecar_fields = frozenset({"exclude_modules"})  # not a GraloraConfig field in peft
    unsupported_peft_keys = {"bias": "none"}

    r: int = 32
    """Total rank of the grid (each block has rank r / gralora_k)."""
    hybrid_r: int = 0
    """Rank of an extra plain LoRA over the whole weight (0: none)."""
    alpha: float = 64
    """Numerator of the scale alpha / (r + hybrid_r)."""
    gralora_dropout: float = 0.0
    """Dropout on the update's input only."""
    gralora_k: int = 2
    """Grid size k: the weight is cut into k x k blocks."""
    fan_in_fan_out: bool = False
    """Kept for peft's files; GPT-2 Conv1D layers are read in the canonical (out, in) layout."""
    init_weights: bool = True
    """True: B = 0 (identity). False: random (tests only)."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        check_positive_int("hybrid_r", self.hybrid_r, allow_zero=True)
        check_positive_int("gralora_k", self.gralora_k)
        check_probability("gralora_dropout", self.gralora_dropout)
        if self.r % self.gralora_k:
            raise ConfigError(f"r={self.r} must be divisible by gralora_k={self.gralora_k}")


class GraloraDelta(DenseDelta):
    def __init__(self, info: LayerInfo, *, r: int, k: int, hybrid: int, scale: float, init: bool, dropout: float):
        super().__init__(info, dropout=dropout)
        self.k, self.scale = k, scale
        out, fan_in = info.out_features, info.in_features
        self.gralora_A = nn.Parameter(kaiming_(torch.empty(k, r, fan_in // k)).transpose(1, 2).contiguous())
        b = torch.zeros(k, out // k, r) if init else kaiming_(torch.empty(k, out // k, r))
        self.gralora_B = nn.Parameter(b.transpose(1, 2).contiguous())  # (k, r, out/k)
        if hybrid:
            self.gralora_A_general = nn.Linear(fan_in, hybrid, bias=False)
            self.gralora_B_general = nn.Linear(hybrid, out, bias=False)
            kaiming_(self.gralora_A_general.weight)
            (nn.init.zeros_ if init else kaiming_)(self.gralora_B_general.weight)

    def delta_weight(self) -> torch.Tensor:
        a, b, k = self.gralora_A.float(), self.gralora_B.float(), self.k
        fan_in, r = a.shape[0] * a.shape[1], a.shape[2]
        block_of = torch.arange(fan_in, device=a.device) // (fan_in // k)  # input l lies in block n(l)
        scattered = a.new_zeros(fan_in, k, r)
        scattered[torch.arange(fan_in, device=a.device), block_of] = a.reshape(fan_in, r)  # (in, k, r)
        # regroup the rank: input block n meets output block j through A's rank slice j and B's slice n
        regrouped = scattered.view(fan_in, k, k, r // k).permute(0, 2, 1, 3).reshape(fan_in, k, r)
        weight = torch.einsum("ikr,kro->iko", regrouped, b).reshape(fan_in, -1).T  # (out, in)
        if hasattr(self, "gralora_A_general"):
            weight = weight + self.gralora_B_general.weight.float() @ self.gralora_A_general.weight.float()
        return weight * self.scale


def build(config: GraloraConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place GraloraConfig is read."""
    if info.kind != "linear":
        raise ConfigError(f"GraLoRA adapts linear layers only; {module_name!r} is a {info.kind} layer")
    k = config.gralora_k
    if info.in_features % k or info.out_features % k:
        raise ConfigError(
            f"gralora_k={k} must divide in_features={info.in_features} and out_features={info.out_features} of {module_name!r}"
        )
    return GraloraDelta(
        info, r=config.r, k=k, hybrid=config.hybrid_r, scale=config.alpha / (config.r + config.hybrid_r),
        init=config.init_weights, dropout=config.gralora_dropout,
    )  # fmt: skip


SPEC = TunerSpec(
    name="gralora",
    kind="delta",
    config=GraloraConfig,
    peft_type="GRALORA",
    dispatch=("linear",),
    build=build,
    paper="https://arxiv.org/abs/2505.20355",
    contract_models=DENSE_CONTRACT_MODELS,
    example_configs=({"r": 4, "alpha": 8, "gralora_k": 2, "hybrid_r": 1},),
)

"""Uni-LoRA: every entry of every layer's A and B is one shared trained scalar, theta[idx] * scale.

Li et al. 2025, "Uni-LoRA: One Vector Is All You Need", https://arxiv.org/abs/2506.00799. All LoRA
factors of an adapter are a fixed projection of one trained vector theta (length d,
`theta_d_length`): each entry reads theta at an index assigned once, so the whole adapter trains d
values whatever its size.

    A[i, j] = theta[idx_A[i, j]] * s,   B likewise,   s = 1 / sqrt(#entries reading that index)
    y = base(x) + (drop(x) A^T) B^T

The indices are a balanced, seeded assignment (each theta entry used floor or ceil(D / d) times, D the
total entries over all layers in module order), drawn with numpy's generator seeded by `proj_seed`,
exactly as peft draws them, so they are rebuilt rather than saved unless `save_indices`. theta starts
uniform(+-`init_theta_d_bound`), so a fresh adapter is not the identity (as in peft). Layer kinds:
Linear and GPT-2 Conv1D.

File layout is peft's: "base_model.unilora_theta_d" once per adapter, and with save_indices
"<module>.unilora_indices_A" / "_B" and "<module>.unilora_scales_A" / "_B".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
    model_level_keys,
)


@dataclass(kw_only=True)
class UniLoraConfig(TunerConfig):
    """Configuration of a Uni-LoRA adapter (field names and meanings are peft's)."""

    tuner_name = "unilora"
    peft_type = "UNILORA"
    unsupported_peft_keys = {"bias": "none"}
    sidecar_fields = frozenset({"exclude_modules"})  # not a UniLoraConfig field in peft

    r: int = 4
    """Rank of the virtual A and B."""
    proj_seed: int = 42
    """Seed of the index assignment."""
    theta_d_length: int = 256
    """Length d of the one trained vector."""
    unilora_dropout: float = 0.0
    """Dropout on the update's input only."""
    fan_in_fan_out: bool = False
    """Kept for peft's files; GPT-2 Conv1D layers are read in the canonical (out, in) layout."""
    init_theta_d_bound: float = 0.02
    """theta starts uniform in [-bound, bound]."""
    init_weights: bool = True
    """True: uniform(+-bound). False: N(0, 1) (tests only)."""
    save_indices: bool = False
    """Save the indices and scales with the adapter (else rebuilt from proj_seed)."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        check_positive_int("proj_seed", self.proj_seed, allow_zero=True)
        check_positive_int("theta_d_length", self.theta_d_length)
        check_probability("unilora_dropout", self.unilora_dropout)


def balanced_indices(total: int, length: int, seed: int) -> torch.Tensor:
    """peft's generate_index: each of `length` indices floor/ceil(total / length) times, shuffled by numpy's seeded generator."""
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(length), total // length)
    if total % length:
        data = np.concatenate([data, rng.choice(length, size=total % length, replace=False)])
    rng.shuffle(data)
    return torch.as_tensor(data, dtype=torch.long)


class UniLoraDelta(DenseDelta):
    """Per-layer index maps; `unilora_theta_d` (one shared Parameter) and the indices are set by `connect`."""

    def __init__(self, info: LayerInfo, *, r: int, dropout: float, persistent: bool):
        super().__init__(info, dropout=dropout)
        for name, shape in (("A", (r, info.in_features)), ("B", (info.out_features, r))):
            self.register_buffer(f"unilora_indices_{name}", torch.zeros(shape, dtype=torch.long), persistent=persistent)
            self.register_buffer(f"unilora_scales_{name}", torch.ones(shape), persistent=persistent)

    def delta_weight(self) -> torch.Tensor:
        theta = self.unilora_theta_d.float()
        a = theta[self.unilora_indices_A] * self.unilora_scales_A.float()  # (r, in)
        b = theta[self.unilora_indices_B] * self.unilora_scales_B.float()  # (out, r)
        return b @ a


def build(config: UniLoraConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place UniLoraConfig is read (with connect)."""
    if info.kind != "linear":
        raise ConfigError(f"Uni-LoRA adapts linear layers only; {module_name!r} is a {info.kind} layer")
    return UniLoraDelta(info, r=config.r, dropout=config.unilora_dropout, persistent=config.save_indices)


def connect(model: nn.Module, config: UniLoraConfig, adapter_name: str, targets: list[str]):
    """One theta for the adapter, and every layer's indices from one balanced assignment in module order."""
    deltas = [model.get_submodule(name).deltas[adapter_name] for name in targets]
    device = deltas[0].unilora_indices_A.device
    d = config.theta_d_length
    theta = (
        torch.empty(d).uniform_(-config.init_theta_d_bound, config.init_theta_d_bound)
        if config.init_weights
        else torch.randn(d)
    )
    theta = nn.Parameter(theta.to(device))
    total = sum(delta.unilora_indices_A.numel() + delta.unilora_indices_B.numel() for delta in deltas)
    indices = balanced_indices(total, d, config.proj_seed)
    scales = torch.bincount(indices, minlength=d).float().clamp_min(1).rsqrt()  # 1 / sqrt(uses) per theta entry
    start = 0
    for delta in deltas:
        delta.unilora_theta_d = theta
        for name in ("A", "B"):
            target = getattr(delta, f"unilora_indices_{name}")
            chunk = indices[start : start + target.numel()].view_as(target)
            start += target.numel()
            target.copy_(chunk)
            getattr(delta, f"unilora_scales_{name}").copy_(scales[chunk])
    return lambda: None


SPEC = TunerSpec(
    name="unilora",
    kind="delta",
    config=UniLoraConfig,
    peft_type="UNILORA",
    dispatch=("linear",),
    build=build,
    connect=connect,
    file_keys=model_level_keys("unilora_theta_d"),
    paper="https://arxiv.org/abs/2506.00799",
    identity_at_init=False,  # theta starts random, as in peft
    contract_models=DENSE_CONTRACT_MODELS,
    example_configs=({"r": 2, "theta_d_length": 16},),
)

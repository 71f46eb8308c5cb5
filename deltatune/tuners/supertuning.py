"""SuperTuning: dW is sparse, trained values at the (1 - sparsity) largest-magnitude entries of W (+ an optional LoRA).

"SuperTuning" (peft's SUPERTUNING), https://arxiv.org/abs/2607.09287. The trainable support is chosen
once, data-free, by weight magnitude (the largest entries, or the smallest with select_top=False), and
the values there are added to W; with `r` set ("Supra"), a LoRA update is added on top:

    dW = scatter(values at idx) + (lora_alpha / r) B A,      y = base(x) + x dW^T

values and B start at zero (identity). The positions are chosen from the base weight when the adapter is
created and, by default (`save_precomputed_indices`), saved with it; otherwise they are chosen again from
the base weight on load, as peft does. Layer kinds: Linear and GPT-2 Conv1D (positions index the
canonical (out, in) weight).

File layout is peft's: "<module>.supertuning_values", "<module>.supertuning_indices" (int32, flat
positions), and "<module>.supertuning_lora_A.weight" / "supertuning_lora_B.weight" with r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.backends import LayerInfo, read_weight
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.tuners.weight_delta import CONTRACT_MODELS, DenseDelta, check_positive_int, check_probability, kaiming_


@dataclass(kw_only=True)
class SupertuningConfig(TunerConfig):
    """Configuration of a SuperTuning adapter (field names and meanings are peft's)."""

    tuner_name = "supertuning"
    peft_type = "SUPERTUNING"
    sidecar_fields = frozenset({"exclude_modules", "layers_to_transform", "layers_pattern"})  # not in peft's config

    sparsity: float = 0.99
    """Fraction of the weight left frozen: 0.99 trains 1% of the entries."""
    select_top: bool = True
    """Train the largest-magnitude entries (False: the smallest)."""
    r: int | None = None
    """Rank of the optional LoRA ("Supra"); None: sparse values only."""
    lora_alpha: float | None = None
    """LoRA scale numerator (default 2 r when r is set)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA's input only."""
    init_weights: bool = True
    """True: zero values and LoRA B (identity). False: random (tests only)."""
    save_precomputed_indices: bool = True
    """Save the chosen positions with the adapter (False: choose them again from the base weight on load)."""

    def validate(self) -> None:
        super().validate()
        check_probability("sparsity", self.sparsity)
        check_probability("lora_dropout", self.lora_dropout)
        if self.r is not None:
            check_positive_int("r", self.r)
            if self.lora_alpha is None:
                self.lora_alpha = 2 * self.r
        elif self.lora_alpha is not None:
            raise ConfigError("lora_alpha is set but r is None; Supra mode needs an explicit r")


class SupertuningDelta(DenseDelta):
    def __init__(self, info: LayerInfo, *, count: int, r: int | None, scale: float, init: bool, dropout: float,
                 persistent: bool):  # fmt: skip
        super().__init__(info)
        self.register_buffer("supertuning_indices", torch.zeros(count, dtype=torch.int32), persistent=persistent)
        self.supertuning_values = nn.Parameter(torch.zeros(count) if init else torch.randn(count))
        self.scale = scale
        if r:
            self.supertuning_lora_A = nn.Linear(info.in_features, r, bias=False)
            self.supertuning_lora_B = nn.Linear(r, info.out_features, bias=False)
            kaiming_(self.supertuning_lora_A.weight.data)
            (nn.init.zeros_ if init else kaiming_)(self.supertuning_lora_B.weight.data)
            self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        out, fan_in = self.info.out_features, self.info.in_features
        values = self.supertuning_values.float()
        flat = values.new_zeros(out * fan_in).scatter_add(0, self.supertuning_indices.long(), values)
        weight = flat.view(out, fan_in)
        if hasattr(self, "supertuning_lora_A"):
            weight = weight + self.scale * (
                self.supertuning_lora_B.weight.float() @ self.supertuning_lora_A.weight.float()
            )
        return weight


def build(config: SupertuningConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place SupertuningConfig is read (with connect)."""
    if info.kind != "linear":
        raise ConfigError(f"SuperTuning adapts linear layers only; {module_name!r} is a {info.kind} layer")
    count = int(info.in_features * info.out_features * (1 - config.sparsity))
    if count < 1:
        raise ConfigError(f"sparsity={config.sparsity} leaves no trainable entry in {module_name!r}; lower it")
    return SupertuningDelta(
        info, count=count, r=config.r, scale=(config.lora_alpha / config.r) if config.r else 0.0,
        init=config.init_weights, dropout=config.lora_dropout, persistent=config.save_precomputed_indices,
    )  # fmt: skip


def connect(model: nn.Module, config: SupertuningConfig, adapter_name: str, targets: list[str]):
    """Choose each layer's positions by the base weight's magnitude (a saved adapter's own positions then replace them)."""
    for name in targets:
        wrapper = model.get_submodule(name)
        delta = wrapper.deltas[adapter_name]
        scores = read_weight(wrapper.base_layer).abs().flatten()
        count = delta.supertuning_indices.numel()
        positions = torch.topk(scores, k=count, largest=config.select_top).indices
        delta.supertuning_indices.copy_(positions.to(torch.int32))
    return lambda: None


SPEC = TunerSpec(
    name="supertuning",
    kind="delta",
    config=SupertuningConfig,
    peft_type="SUPERTUNING",
    dispatch=("linear",),
    build=build,
    connect=connect,
    paper="https://arxiv.org/abs/2607.09287",
    contract_models=CONTRACT_MODELS,
    example_configs=({"sparsity": 0.9, "r": 2},),
)

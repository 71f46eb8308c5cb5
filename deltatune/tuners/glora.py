"""GLoRA: W' = W0 + W0 ⊙ A + B,  b' = b0 + b0 ⊙ D + E + W0 C  (generalised LoRA, one support tensor per slot).

Chavan et al. 2023, "One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning",
https://arxiv.org/abs/2306.07967. Five slots cover LoRA, (IA)^3-like scaling, bias shifts and
prompt-like shifts in one form; each slot is a low-rank product ("lora"), a vector ("vector"), a scalar
("constant") or absent ("none"), set by `config_A_B`, `config_C` and `config_D_E`:

    y = base(x) + x (W0 ⊙ A + B)^T + (b0 ⊙ D + E + W0 C)      (the bias terms only where the layer has a bias)

Every trained tensor starts at zero except the "lora" paths' up-projections (Kaiming-uniform), so a fresh
adapter is the identity. The update depends on W0 and b0, so merging keeps them for an exact unmerge.
Layer kinds: Linear and GPT-2 Conv1D.

File layout is peft's: "<module>.glora_<slot>.Xd" / ".Xu" (lora paths), ".X" (vector / constant), and
".zeros" buffers for absent slots (peft saves them too).
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

_KINDS = {"config_A_B": ("lora", "vector", "constant", "none"), "config_C": ("lora", "vector", "none"),
          "config_D_E": ("vector", "constant", "none")}  # fmt: skip


@dataclass(kw_only=True)
class GloraConfig(TunerConfig):
    """Configuration of a GLoRA adapter (field names and meanings are peft's)."""

    tuner_name = "glora"
    peft_type = "GLORA"
    unsupported_peft_keys = {"bias": "none"}
    sidecar_fields = frozenset({"exclude_modules", "layers_to_transform", "layers_pattern"})  # not in peft's config
    # `deltatune sft`: D scales the base bias, which is all zeros in a freshly initialised model, so D would get no
    # gradient and trip the training loop's dead-parameter guard; pass config_D_E=constant for pretrained biases
    run_defaults = {"config_D_E": "none"}

    r: int = 8
    """Rank of the "lora" paths."""
    config_A_B: str = "lora"
    """Form of A (scales W0) and B (added to W): "lora", "vector", "constant" or "none"."""
    config_C: str = "lora"
    """Form of C (W0 C shifts the bias): "lora", "vector" or "none"."""
    config_D_E: str = "constant"
    """Form of D (scales b0) and E (added to b): "vector", "constant" or "none"."""
    init_weights: bool = True
    """True: identity at init. False: random (tests only)."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        for name, kinds in _KINDS.items():
            if getattr(self, name) not in kinds:
                raise ConfigError(f"{name} must be one of {list(kinds)}, got {getattr(self, name)!r}")


def _path(kind: str, rows: int, cols: int, *, r: int, column: bool, init: bool) -> nn.Module:
    """One slot's support tensor: value() gives a tensor that broadcasts against (rows, cols)."""
    path = nn.Module()
    if kind == "lora":
        path.Xd = nn.Parameter(torch.zeros(rows, r) if init else kaiming_(torch.empty(rows, r)))
        path.Xu = nn.Parameter(kaiming_(torch.empty(r, cols)))
    elif kind == "vector":
        x = torch.zeros(rows, 1) if column else torch.zeros(rows)
        path.X = nn.Parameter(x if init else kaiming_(x.view(1, -1) if x.dim() == 1 else x).view_as(x))
    elif kind == "constant":
        path.X = nn.Parameter(torch.zeros(1) if init else torch.randn(1) * 0.02)
    else:
        path.register_buffer("zeros", torch.zeros((rows, cols) if column else (rows,)))
    return path


def _value(path: nn.Module) -> torch.Tensor:
    if hasattr(path, "Xd"):
        return path.Xd.float() @ path.Xu.float()
    if hasattr(path, "X"):
        return path.X.float() if path.X.numel() > 1 else path.X.float()[0]
    return path.zeros.float()


class GloraDelta(nn.Module):
    def __init__(self, info: LayerInfo, *, r: int, ab: str, c: str, de: str, init: bool):
        super().__init__()
        out, fan_in = info.out_features, info.in_features
        self.kinds = (c, de, r, init)
        self.glora_A = _path(ab, out, fan_in, r=r, column=True, init=init)
        self.glora_B = _path(ab, out, fan_in, r=r, column=True, init=init)
        self.set_bias_slots(out, fan_in, has_bias=True)

    def set_bias_slots(self, out: int, fan_in: int, *, has_bias: bool) -> None:
        """C, D, E exist only on layers with a bias (else absent, as peft builds them)."""
        c, de, r, init = self.kinds
        c, de = (c, de) if has_bias else ("none", "none")
        self.glora_C = _path(c, fan_in, 1, r=r, column=True, init=init)
        self.glora_D = _path(de, out, 1, r=r, column=False, init=init)
        self.glora_E = _path(de, out, 1, r=r, column=False, init=init)

    def _adapted(self, weight: torch.Tensor, bias: torch.Tensor | None):
        new_weight = weight + weight * _value(self.glora_A) + _value(self.glora_B)
        if bias is None:
            return new_weight, None
        shift = (weight @ _value(self.glora_C)).squeeze(-1)  # (out,)
        return new_weight, bias + bias * _value(self.glora_D) + _value(self.glora_E) + shift

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        result = base(x)
        weight = base.weight().float()
        bias = base.bias.float() if base.bias is not None else None
        new_weight, new_bias = self._adapted(weight, bias)
        update = F.linear(x, (new_weight - weight).to(x.dtype))
        if new_bias is not None:
            update = update + (new_bias - bias).to(x.dtype)
        return result + update.to(result.dtype)

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None):
        new_weight, new_bias = self._adapted(weight, bias)
        return new_weight, new_bias, (weight.clone(), None if bias is None else bias.clone())

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None, original):
        return original[0].to(weight), (None if bias is None else original[1].to(bias))


def build(config: GloraConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place GloraConfig is read (connect drops the bias slots on bias-less layers)."""
    if info.kind != "linear":
        raise ConfigError(f"GLoRA adapts linear layers only; {module_name!r} is a {info.kind} layer")
    return GloraDelta(
        info, r=config.r, ab=config.config_A_B, c=config.config_C, de=config.config_D_E, init=config.init_weights
    )


def connect(model: nn.Module, config: GloraConfig, adapter_name: str, targets: list[str]):
    """A layer without a bias gets absent C, D, E slots (peft builds them so)."""
    for name in targets:
        wrapper = model.get_submodule(name)
        if getattr(wrapper.base_layer, "bias", None) is None:
            delta = wrapper.deltas[adapter_name]
            delta.set_bias_slots(wrapper.layer_info.out_features, wrapper.layer_info.in_features, has_bias=False)
            delta.to(next(delta.parameters()).device)
    return lambda: None


SPEC = TunerSpec(
    name="glora",
    kind="delta",
    config=GloraConfig,
    peft_type="GLORA",
    dispatch=("linear",),
    build=build,
    connect=connect,
    paper="https://arxiv.org/abs/2306.07967",
    contract_models=CONTRACT_MODELS,
    example_configs=({"r": 2, "config_C": "vector", "config_D_E": "vector"},),
)

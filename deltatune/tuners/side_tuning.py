"""Side-tuning: a small side network beside a frozen module, blended with it through a learned gate.

    y = (1 - a) * stopgrad(M(x)) + a * side(stopgrad(x)),    side(x) = W2 act(W1 x + b1) + b2

Zhang et al. 2020, https://arxiv.org/abs/1912.13503. The base module M and everything before it stay
frozen and are never backpropagated through: the side network reads a detached copy of M's input,
M runs under no_grad, and only the gate a and the side network train. The paper blends a frozen
network's representation with a side network's; here the blend sits at any module whose input and
output are float tensors with features last, typically the backbone's final norm or last block, so
that only the head (if any) lies between the blend and the loss.

The gate is a single learned scalar `a` (the paper's alpha) starting at `alpha_init`. Its default 0
makes a freshly injected model compute exactly what the base model computes; with a = 0 the side
network gets no gradient on the first step, the gate does, and both train from the second step on
(as LoRA's A does while B is zero). The paper's curriculum on alpha is left to the training loop.

Targets: `target_modules` (peft's rules), any module mapping (..., in) -> (..., out): linear layers
use their own widths, other modules (norms, blocks) `hidden_size` (default: the width of the
module's 1-D weight, else the model config's hidden_size). Modules reading token ids (embeddings) or
channels-first maps (convolutions) are refused. Not mergeable (the side network is nonlinear).
The file is deltatune's own: keys "<module>.side_alpha", "<module>.side_net.{0,2}.{weight,bias}".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune import backends
from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.core.wrapper import BaseCall

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass(kw_only=True)
class SideTuningConfig(TunerConfig):
    """Configuration of side-tuning (a gated side network at each target module)."""

    tuner_name = "side_tuning"
    peft_type = "SIDE_TUNING"
    run_defaults = {"target_modules": r"(model\.norm|transformer\.ln_f|vit\.layernorm)"}  # the final norm

    side_hidden_size: int = 64
    """Width of the side network's hidden layer."""
    non_linearity: str = "gelu"
    """Activation inside the side network: "relu", "gelu", "silu" or "tanh"."""
    alpha_init: float = 0.0
    """Initial gate a (weight of the side network); 0 keeps the model unchanged at init."""
    hidden_size: int | None = None
    """Input/output width for targets that are not linear layers; unset: read from the target's 1-D
    weight (norms) or the model config's hidden_size."""

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.side_hidden_size, int) or self.side_hidden_size < 1:
            raise ConfigError(f"side_hidden_size must be an integer >= 1, got {self.side_hidden_size!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise ConfigError(f"non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}")
        if not isinstance(self.alpha_init, (int, float)) or isinstance(self.alpha_init, bool):
            raise ConfigError(f"alpha_init must be a number, got {self.alpha_init!r}")
        if self.hidden_size is not None and (not isinstance(self.hidden_size, int) or self.hidden_size < 1):
            raise ConfigError(f"hidden_size must be an integer >= 1 (or None), got {self.hidden_size!r}")


# ---------------------------------------------------------------------------------------------
# Math module: tensors and plain numbers only.
# ---------------------------------------------------------------------------------------------
class SideBlend(nn.Module):
    """(1 - a) * M(x) + a * side(x), with M and x cut off from autograd."""

    def __init__(self, in_features: int, out_features: int, *, hidden: int, activation: str, alpha: float):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.side_net = nn.Sequential(
            nn.Linear(in_features, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, out_features)
        )
        self.side_alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        with torch.no_grad():  # the backbone is never backpropagated (and keeps no activations for it)
            result = base(x)
        if not isinstance(result, torch.Tensor) or not x.is_floating_point() or x.shape[-1] != self.in_features:
            raise ConfigError(
                f"side-tuning maps (..., {self.in_features}) float inputs to (..., {self.out_features}) outputs, but "
                f"this module got {_describe(x)} and returned {_describe(result)}; target a module whose input and "
                "output are float tensors with features last (a norm, a linear layer, a block returning a tensor)"
            )
        if result.shape[-1] != self.out_features:
            raise ConfigError(f"side-tuning expected outputs (..., {self.out_features}), got {_describe(result)}")
        dtype = self.side_alpha.dtype
        side = self.side_net(x.detach().to(dtype))  # (..., out)
        alpha = self.side_alpha
        return ((1 - alpha) * result.to(dtype) + alpha * side).to(result.dtype)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


# ---------------------------------------------------------------------------------------------
# The one place SideTuningConfig is read.
# ---------------------------------------------------------------------------------------------
def build(config: SideTuningConfig, info: LayerInfo, module_name: str) -> nn.Module:
    if info.kind == "linear":
        widths = (info.in_features, info.out_features)
    else:
        widths = (config.hidden_size, config.hidden_size)
    return SideBlend(*widths, hidden=config.side_hidden_size, activation=config.non_linearity, alpha=config.alpha_init)


def prepare(model: nn.Module, config: SideTuningConfig, targets: list[str]) -> SideTuningConfig:
    """Refuse targets the side network cannot map; fill hidden_size for targets that are not linear."""
    others: list[nn.Module] = []
    for name in targets:
        module = model.get_submodule(name)
        module = getattr(module, "base_layer", module)  # already wrapped by another adapter
        info = backends.describe(module)
        if info is None:
            others.append(module)
        elif info.kind != "linear":
            what = "token ids" if info.kind == "embedding" else "channels-first feature maps"
            raise ConfigError(
                f"side-tuning cannot target {name!r} ({type(module).__name__}): its input is {what}, which the side "
                "network (an MLP over the last dimension) cannot map. Target a module whose input and output are "
                "(..., features) float tensors, e.g. the final norm or the last block."
            )
    if not others or config.hidden_size is not None:
        return config
    widths = set()
    for module in others:
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 1:
            widths.add(weight.shape[0])
        else:
            widths.add(getattr(getattr(model, "config", None), "hidden_size", None))
    if len(widths) != 1 or not isinstance(next(iter(widths)), int):
        raise ConfigError(
            f"side-tuning cannot tell the input/output width of targets {targets[:5]} (found {widths}): set "
            "SideTuningConfig.hidden_size"
        )
    return config.replace(hidden_size=widths.pop())


SPEC = TunerSpec(
    name="side_tuning",
    kind="side",
    config=SideTuningConfig,
    peft_type="SIDE_TUNING",
    dispatch=("any",),
    build=build,
    prepare=prepare,
    mergeable=False,
    paper="https://arxiv.org/abs/1912.13503",
    example_configs=(
        # the final norm of the transformers models, the hidden layer of the toy MLP
        {"target_modules": r"(model\.norm|transformer\.ln_f|vit\.layernorm|lin1)", "side_hidden_size": 8},
    ),
)

"""(IA)^3: learned vectors that rescale activations. Liu et al. 2022, https://arxiv.org/abs/2205.05638.

For a target layer y = W x + b, with W in R^{out x in}, one vector l trains:
    output scaling (attention keys/values):   y = l * (W x + b),   l in R^{out}
    input scaling (feed-forward layers):      y = W (l * x) + b,   l in R^{in}
The vectors start at 1, so a freshly injected model computes exactly what the base computes, and
only in or out values train per layer (the fewest of any delta tuner here). Which targets scale
their input is `feedforward_modules`, as in peft.

Merging is a pure function on the weight: input scaling multiplies the columns of W (the bias is
untouched), output scaling multiplies the rows of W and the bias. Unmerge divides, so a vector with
a zero entry cannot be unmerged (refused; the layer stays merged). Layer kinds: Linear, GPT-2
Conv1D (canonical (out, in) weight) and Conv1d/2d/3d (per-channel scaling of (out, in/groups, *k)).

File layout is peft's: one tensor "<module>.ia3_l" per target, shaped (out, 1) for output scaling
and (1, in) for input scaling on linear layers, (1, C, 1, ...) on convolutions. The vector stays in
fp32 whatever the base dtype; each forward casts it to the activation dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.backends import LayerInfo, describe
from deltatune.core import matching
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.core.wrapper import BaseCall, MergeError


@dataclass(kw_only=True)
class IA3Config(TunerConfig):
    """Configuration of an (IA)^3 adapter (field names and meanings are peft's)."""

    tuner_name = "ia3"
    peft_type = "IA3"
    sidecar_fields = frozenset({"layers_to_transform", "layers_pattern"})

    feedforward_modules: list[str] | str | None = None
    """Targets whose *input* is scaled (the paper's feed-forward layers); the others scale their
    output. Must name a subset of target_modules. A str is a regex over the whole module name; a list
    entry selects the targets whose name ends with it (peft's rule: plain suffix, no '.' needed)."""
    init_ia3_weights: bool = True
    """Start the vectors at 1 (identity). False draws them from N(0, 1): for tests only."""
    fan_in_fan_out: bool = False
    """Set automatically when a target is a GPT-2 Conv1D (weights stored as (in, out)); kept for peft."""

    def validate(self) -> None:
        super().validate()
        ff = self.feedforward_modules
        if isinstance(self.feedforward_modules, (set, tuple)):
            ff = self.feedforward_modules = sorted(ff)
        if ff is not None and not isinstance(ff, str):
            if not isinstance(ff, list) or not all(isinstance(v, str) and v for v in ff):
                raise ConfigError(f"feedforward_modules must be a list of module names or a regex string, got {ff!r}")
        if isinstance(ff, str):
            try:
                re.compile(ff)
            except re.error as exc:
                raise ConfigError(f"feedforward_modules={ff!r} is not a valid regular expression: {exc}") from None
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        targets = self.target_modules
        if isinstance(ff, list) and isinstance(targets, list):
            outside = [f for f in ff if not any(_names_same_modules(f, t) for t in targets)]
            if outside:
                raise ConfigError(
                    f"feedforward_modules must be a subset of target_modules: {outside} are not in "
                    f"target_modules={targets}. Add them to target_modules or drop them from feedforward_modules."
                )

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> IA3Config:
        """As TunerConfig.from_dict, reading feedforward entries as peft applies them: peft fills
        feedforward_modules from its per-architecture defaults even for modules not targeted (a
        default Llama config saves ["down_proj"] with target_modules ["q_proj", "v_proj"]), and an
        entry that can select no target changes nothing, so it is dropped rather than refused."""
        ff, targets = data.get("feedforward_modules") if isinstance(data, dict) else None, None
        if isinstance(ff, list) and isinstance(data.get("target_modules"), list):
            targets = data["target_modules"]
            kept = [f for f in ff if any(_names_same_modules(f, t) or t.endswith(f) for t in targets)]
            data = {**data, "feedforward_modules": kept}
        return super().from_dict(data, source=source)


def _names_same_modules(a: str, b: str) -> bool:
    """Whether list entries a and b can name the same module (equal, or one a dotted suffix of the other)."""
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def is_feedforward(module_name: str, feedforward_modules: list[str] | str | None) -> bool:
    """peft's rule: regex full match for a str, plain `endswith` for each list entry."""
    if feedforward_modules is None:
        return False
    if isinstance(feedforward_modules, str):
        return matching.fullmatch(feedforward_modules, module_name, field="feedforward_modules")
    return any(module_name.endswith(key) for key in feedforward_modules)


# ---------------------------------------------------------------------------------------------
# Math module: tensors and plain numbers only.
# ---------------------------------------------------------------------------------------------
class IA3Scale(nn.Module):
    """A learned vector scaling a layer's input channels or output channels.

    `param_shape` is the stored (peft) shape; `weight_view` reshapes the vector to broadcast over the
    canonical weight, `act_view` over activations (features last for linear, channels at dim 1 for conv).
    """

    def __init__(self, size: int, *, scale_input: bool, conv_ndim: int, groups: int = 1, init: bool = True):
        super().__init__()
        self.scale_input, self.conv_ndim, self.groups = scale_input, conv_ndim, groups
        if conv_ndim:
            shape = (1, size) + (1,) * conv_ndim  # (1, C, 1, ...)
        else:
            shape = (1, size) if scale_input else (size, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape) if init else torch.randn(shape))

    def _act_view(self, dtype: torch.dtype) -> torch.Tensor:
        vec = self.ia3_l.to(dtype)
        return vec if self.conv_ndim else vec.flatten()  # (1, C, 1, ..) or (features,)

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        if self.scale_input:
            return base(x * self._act_view(x.dtype))  # (..., in)
        result = base(x)
        return result * self._act_view(result.dtype)  # (..., out)

    def _weight_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """The vector broadcast over the canonical weight (out, in/groups, *k)."""
        vec = self.ia3_l.float().flatten()
        trailing = (1,) * (weight.dim() - 2)
        if not self.scale_input:
            return vec.view(-1, 1, *trailing)  # rows
        if self.groups == 1:
            return vec.view(1, -1, *trailing)  # columns
        out, in_per_group = weight.shape[0], weight.shape[1]
        per_group = vec.view(self.groups, 1, in_per_group).expand(self.groups, out // self.groups, in_per_group)
        return per_group.reshape(out, in_per_group, *trailing)  # each output row sees its group's inputs

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None):
        scale = self._weight_scale(weight).to(weight)
        if not self.scale_input and bias is not None:
            bias = bias * self.ia3_l.float().flatten().to(bias)
        return weight * scale, bias, None

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None, _ctx: object):
        vec = self.ia3_l.float()
        if (vec == 0).any():
            raise MergeError("an (IA)^3 vector has a zero entry, so its merge cannot be undone; the layer stays merged")
        weight = weight / self._weight_scale(weight).to(weight)
        if not self.scale_input and bias is not None:
            bias = bias / vec.flatten().to(bias)
        return weight, bias


# ---------------------------------------------------------------------------------------------
# The one place IA3Config is read.
# ---------------------------------------------------------------------------------------------
def build(config: IA3Config, info: LayerInfo, module_name: str) -> nn.Module:
    scale_input = is_feedforward(module_name, config.feedforward_modules)
    size = info.in_features if scale_input else info.out_features
    if info.kind == "linear":
        return IA3Scale(size, scale_input=scale_input, conv_ndim=0, init=config.init_ia3_weights)
    if info.kind == "conv":
        return IA3Scale(
            size, scale_input=scale_input, conv_ndim=info.conv_ndim, groups=info.groups, init=config.init_ia3_weights
        )
    raise ConfigError(f"(IA)^3 cannot adapt {module_name!r} (layer kind {info.kind!r})")


def prepare(model: nn.Module, config: IA3Config, targets: list[str]) -> IA3Config:
    """Check feedforward_modules against the real targets and write a config peft reads the same way.

    - every feedforward entry must select at least one target (a typo would silently scale outputs);
    - fan_in_fan_out records whether targets are GPT-2 Conv1D layers, as peft sets it;
    - an unset feedforward_modules is written as [] (peft would otherwise fill in its own defaults);
    - when peft's stricter set check (feedforward entries literally among target_modules) would fail,
      or layers_to_transform (not an IA3 field in peft) narrows the targets, both lists are written as
      the exact module names, which peft matches identically.
    """
    ff = config.feedforward_modules
    entries = [ff] if isinstance(ff, str) else list(ff or [])
    for entry in entries:
        if not any(is_feedforward(t, entry if isinstance(ff, str) else [entry]) for t in targets):
            raise ConfigError(
                f"feedforward_modules entry {entry!r} matches none of the targets; feedforward_modules must be a "
                f"subset of target_modules. Targets: {matching.leaf_names(targets)}"
            )
    changes: dict = {}
    transposed = any(getattr(describe(model.get_submodule(t)), "fan_in_fan_out", False) for t in targets)
    if transposed != config.fan_in_fan_out:
        changes["fan_in_fan_out"] = transposed
    peft_subset = (
        isinstance(ff, str)
        or not isinstance(config.target_modules, list)
        or set(ff or []) <= set(config.target_modules)
    )
    if config.layers_to_transform is not None or not peft_subset:
        changes.update(
            target_modules=list(targets),
            feedforward_modules=[t for t in targets if is_feedforward(t, ff)],
            layers_to_transform=None,
            layers_pattern=None,
        )
    elif ff is None:
        changes["feedforward_modules"] = []
    return config.replace(**changes) if changes else config


SPEC = TunerSpec(
    name="ia3",
    kind="delta",
    config=IA3Config,
    peft_type="IA3",
    dispatch=("linear", "conv"),
    build=build,
    prepare=prepare,
    paper="https://arxiv.org/abs/2205.05638",
    example_configs=(
        # some targets of each tiny model scale their input, the others their output: MLP lin1, ToyConv
        # conv2, ToyEmbedding proj, Llama down_proj, GPT-2 c_fc, BERT value, T5 wo, ViT/Swin v_proj + patch conv
        {"feedforward_modules": r"(.*\.)?(lin1|conv2|proj|down_proj|c_fc|value|wo|v_proj|projection)"},
    ),
)

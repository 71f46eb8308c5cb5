"""Bottleneck adapters: a small down-up MLP on a layer's output (sequential) or beside it (parallel).

    sequential (Houlsby, Pfeiffer):  y = h + s * up(act(down(dropout(h)))),   h = base(x)
    parallel:                        y = base(x) + s * up(act(down(dropout(x))))

with down in R^{b x d}, up in R^{out x b}, b = bottleneck_size (or d // reduction_factor) and s =
`scaling`. `up` starts at zero, so a freshly injected model computes exactly what the base model
computes; down and up (with biases) train, b * (d + out) + b + out values per target.

- Houlsby et al. 2019, https://arxiv.org/abs/1902.00751: an adapter after the attention output
  projection and after the feed-forward output projection of every block (before the residual add).
- Pfeiffer et al. 2021, https://arxiv.org/abs/2005.00247: after the feed-forward output only (about
  half the parameters, similar quality).
- Parallel (He et al. 2022, https://arxiv.org/abs/2110.04366): the adapter reads the targeted layer's
  input and its scaled output is added beside the layer's own, on the same default targets.

Targets: `target_modules` as everywhere (peft's rules); unset, they default by role to the attention
output and feed-forward output projections of common architectures (Llama/Mistral/Qwen `o_proj`,
`down_proj`; GPT-2 `attn.c_proj`, `mlp.c_proj`; BERT/ViT `attention.output.dense`, `output.dense`;
T5 `o`, `wo`; OPT `out_proj`, `fc2`). The adapter is nonlinear, so it cannot be merged into the base
weights: merge_adapter refuses it (keep it unmerged, or unload()).

The file is deltatune's own (peft has no bottleneck adapters): keys "<module>.adapter_down.weight",
"<module>.adapter_up.weight" (+ biases), peft_type "BOTTLENECK_ADAPTER".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.core.wrapper import BaseCall

ATTENTION_OUTPUT = r"o_proj|out_proj|attn\.c_proj|attention\.output\.dense|SelfAttention\.o|EncDecAttention\.o"
FEEDFORWARD_OUTPUT = r"down_proj|fc2|mlp\.c_proj|(?<!attention\.)output\.dense|DenseReluDense\.wo|dense_4h_to_h"
ADAPTER_TYPES = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}


@dataclass(kw_only=True)
class AdapterConfig(TunerConfig):
    """Configuration of a bottleneck adapter (Houlsby, Pfeiffer or parallel)."""

    tuner_name = "adapter"
    peft_type = "BOTTLENECK_ADAPTER"

    adapter_type: str = "houlsby"
    """"houlsby" (after attention and feed-forward outputs), "pfeiffer" (after feed-forward outputs
    only) or "parallel" (beside the targeted layers, reading their input). Chooses the default targets."""
    bottleneck_size: int | None = None
    """Width b of the bottleneck; unset: the target's output width // reduction_factor (at least 1)."""
    reduction_factor: int = 16
    """Used when bottleneck_size is unset: b = out_features // reduction_factor."""
    non_linearity: str = "relu"
    """Activation between down and up: "relu", "gelu", "silu" ("swish") or "tanh"."""
    adapter_dropout: float = 0.0
    """Dropout on the adapter's input only; the frozen path is never dropped."""
    scaling: float = 1.0
    """s in the formula; He et al. use 4.0 for parallel adapters."""

    def __post_init__(self) -> None:
        if self.target_modules is None and self.adapter_type in ADAPTER_TYPES:
            roles = (
                FEEDFORWARD_OUTPUT if self.adapter_type == "pfeiffer" else f"{ATTENTION_OUTPUT}|{FEEDFORWARD_OUTPUT}"
            )
            self.target_modules = rf"(.*\.)?({roles})"
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.adapter_type not in ADAPTER_TYPES:
            raise ConfigError(f"adapter_type must be one of {list(ADAPTER_TYPES)}, got {self.adapter_type!r}")
        size = self.bottleneck_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ConfigError(f"bottleneck_size must be an integer >= 1 (or None), got {size!r}")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ConfigError(f"reduction_factor must be an integer >= 1, got {self.reduction_factor!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise ConfigError(f"non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}")
        if not isinstance(self.adapter_dropout, (int, float)) or not 0 <= self.adapter_dropout < 1:
            raise ConfigError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout!r}")
        if not isinstance(self.scaling, (int, float)) or isinstance(self.scaling, bool):
            raise ConfigError(f"scaling must be a number, got {self.scaling!r}")


# ---------------------------------------------------------------------------------------------
# Math module: tensors and plain numbers only.
# ---------------------------------------------------------------------------------------------
class BottleneckAdapter(nn.Module):
    """up(act(down(x))) * scale added to the layer's output (sequential) or beside it (parallel)."""

    def __init__(
        self, in_features: int, out_features: int, *, bottleneck: int, activation: str, dropout: float,
        scale: float, parallel: bool,
    ):  # fmt: skip
        super().__init__()
        width = in_features if parallel else out_features
        self.adapter_down = nn.Linear(width, bottleneck)
        self.adapter_up = nn.Linear(bottleneck, out_features)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale, self.parallel = scale, parallel
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)  # identity at init
        nn.init.zeros_(self.adapter_up.bias)

    def _update(self, h: torch.Tensor) -> torch.Tensor:
        dtype = self.adapter_down.weight.dtype  # adapters stay fp32 on low-precision bases
        update = self.adapter_up(self.act(self.adapter_down(self.dropout(h.to(dtype)))))  # (..., out)
        return (update * self.scale).to(h.dtype)

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        result = base(x)  # (..., out)
        return result + self._update(x if self.parallel else result)


# ---------------------------------------------------------------------------------------------
# The one place AdapterConfig is read.
# ---------------------------------------------------------------------------------------------
def build(config: AdapterConfig, info: LayerInfo, module_name: str) -> nn.Module:
    width = info.out_features
    bottleneck = config.bottleneck_size or max(1, width // config.reduction_factor)
    return BottleneckAdapter(
        info.in_features, info.out_features, bottleneck=bottleneck, activation=config.non_linearity,
        dropout=config.adapter_dropout, scale=config.scaling, parallel=config.adapter_type == "parallel",
    )  # fmt: skip


SPEC = TunerSpec(
    name="adapter",
    kind="delta",
    config=AdapterConfig,
    peft_type="BOTTLENECK_ADAPTER",
    dispatch=("linear",),
    build=build,
    mergeable=False,
    paper="https://arxiv.org/abs/1902.00751",
    example_configs=(
        {"adapter_type": "houlsby", "bottleneck_size": 4},
        {"adapter_type": "parallel", "reduction_factor": 4, "non_linearity": "gelu", "scaling": 2.0},
    ),
)

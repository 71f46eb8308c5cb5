"""LoHa: dW = s * (W1a W1b) ⊙ (W2a W2b), a Hadamard product of two rank-r factorizations, s = alpha / r.

Hyeon-Woo et al. 2022 (FedPara), https://arxiv.org/abs/2108.06098; LyCORIS (Yeh et al. 2024),
https://arxiv.org/abs/2309.14859. The element-wise product of two rank-r matrices has rank up to
r^2, so LoHa reaches higher ranks than LoRA for the same 2 r (in + out) values per layer.

    y = base(x) + op(x, dW)        op = the layer's own linear map or convolution, without bias

W1a, W1b, W2a are Kaiming-uniform and W2b starts at zero, so a fresh adapter is the identity.
Layer kinds: Linear and GPT-2 Conv1D (W1a: (out, r), W1b: (r, in)), Conv1d/2d (the kernel folded
into the input dimension: W1b: (r, in * k...)); with `use_effective_conv2d` a convolution with a
kernel > 1 uses core tensors t1, t2 (r, r, *k) and W1a: (r, out), W1b: (r, in) instead:
dW = s * (t1 x1 W1a x2 W1b) ⊙ (t2 x1 W2a x2 W2b) (mode products). Training-time extras:
`rank_dropout` drops whole output rows of dW (rescaled), `module_dropout` skips the update.

File layout is peft's: "<module>.hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b" (and "hada_t1",
"hada_t2" for effective convolutions).
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
    LycorisConfig,
    drop_rows,
    kaiming_,
    weight_shape,
)


@dataclass(kw_only=True)
class LoHaConfig(LycorisConfig):
    """Configuration of a LoHa adapter (field names and meanings are peft's)."""

    tuner_name = "loha"
    peft_type = "LOHA"

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True or False, got {self.init_weights!r}")


class LoHaDelta(DenseDelta):
    """dW = s (W1a W1b) ⊙ (W2a W2b), reshaped to the base's canonical weight."""

    def __init__(
        self, info: LayerInfo, *, r: int, scale: float, effective: bool, init: bool, rank_dropout: float, **kw
    ):
        super().__init__(info, **kw)
        self.scale, self.rank_dropout = scale, rank_dropout
        shape = weight_shape(info)
        out, fan_in = shape[0], shape[1]
        if effective:  # cores carry the kernel: (r, r, k1, k2); Conv1d's kernel gets a trailing 1
            kernel = tuple(shape[2:]) if len(shape) == 4 else (shape[2], 1)
            self.hada_t1 = nn.Parameter(torch.empty(r, r, *kernel))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, *kernel))
            a_shape, b_shape = (r, out), (r, fan_in)
        else:
            a_shape, b_shape = (out, r), (r, math.prod(shape[1:]))
        self.hada_w1_a = nn.Parameter(kaiming_(torch.empty(a_shape)))
        self.hada_w1_b = nn.Parameter(kaiming_(torch.empty(b_shape)))
        self.hada_w2_a = nn.Parameter(kaiming_(torch.empty(a_shape)))
        self.hada_w2_b = nn.Parameter(torch.zeros(b_shape) if init else kaiming_(torch.empty(b_shape)))
        if effective:
            kaiming_(self.hada_t1), kaiming_(self.hada_t2)
        self.shape = shape

    def delta_weight(self) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (p.float() for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b))
        if hasattr(self, "hada_t1"):  # mode products of the cores with the factors: (out, in, k1, k2)
            one = torch.einsum("ijkl,jr,ip->prkl", self.hada_t1.float(), w1b, w1a)
            two = torch.einsum("ijkl,jr,ip->prkl", self.hada_t2.float(), w2b, w2a)
            weight = one * two
        else:
            weight = (w1a @ w1b) * (w2a @ w2b)  # (out, in * k...)
        return (weight * self.scale).reshape(self.shape)

    def train_delta_weight(self) -> torch.Tensor:
        weight = self.delta_weight()
        return drop_rows(weight, self.rank_dropout, rescale=True) if self.rank_dropout else weight


def build(config: LoHaConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place LoHaConfig is read."""
    if info.kind not in ("linear", "conv"):
        raise ConfigError(f"LoHa cannot adapt {module_name!r} (layer kind {info.kind!r}); use Linear or Conv layers")
    r, scale = config.rank_and_scale(module_name)
    effective = config.use_effective_conv2d and info.conv_ndim in (1, 2) and any(k != 1 for k in info.kernel_size)
    return LoHaDelta(
        info, r=r, scale=scale, effective=effective, init=config.init_weights,
        rank_dropout=config.rank_dropout, module_dropout=config.module_dropout,
    )  # fmt: skip


SPEC = TunerSpec(
    name="loha",
    kind="delta",
    config=LoHaConfig,
    peft_type="LOHA",
    dispatch=("linear", "conv"),
    build=build,
    paper="https://arxiv.org/abs/2108.06098",
    contract_models=DENSE_CONTRACT_MODELS,
    example_configs=({"r": 2, "alpha": 4, "use_effective_conv2d": True},),
)

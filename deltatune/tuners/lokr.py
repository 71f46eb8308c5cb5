"""LoKr: dW = s * (W1 ⊗ W2), a Kronecker product of two small matrices, s = alpha / r.

Yeh et al. 2024 (LyCORIS), https://arxiv.org/abs/2309.14859; Edalati et al. 2022 (KronA),
https://arxiv.org/abs/2212.10650. With out = a * b and in = c * d (factors near the square root,
or `decompose_factor`), W1 is (a, c) and W2 is (b, d), so a full-rank update of a (4096, 4096)
layer costs two 64 x 64 matrices. A factor larger than 2 r is itself low-rank: W2 = W2a W2b
(and W1 = W1a W1b with `decompose_both`).

    y = base(x) + op(x, dW)        op = the layer's own linear map or convolution, without bias

W1 (or W1a) starts at zero, so a fresh adapter is the identity (`init_weights="lycoris"` zeroes W2
instead). Convolutions: W2 carries the kernel, (b, d, *k); or, factored, W2b is (r, d * k...); with
`use_effective_conv2d` a core t2 (r, r, *k) with W2a: (r, b), W2b: (r, d). Training-time extras as
in LoHa: `rank_dropout` (rescaled only with `rank_dropout_scale`) and `module_dropout`.

File layout is peft's: "<module>.lokr_w1" or "lokr_w1_a"/"lokr_w1_b", and "lokr_w2" or
"lokr_w2_a"/"lokr_w2_b" (+ "lokr_t2").
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
class LoKrConfig(LycorisConfig):
    """Configuration of a LoKr adapter (field names and meanings are peft's)."""

    tuner_name = "lokr"
    peft_type = "LOKR"

    decompose_both: bool = False
    """Also factor W1 as W1a W1b when it is larger than 2 r."""
    decompose_factor: int = -1
    """Target size of W1's dimensions (a, c); -1 splits each dimension near its square root."""
    rank_dropout_scale: bool = False
    """Rescale the kept rows of rank dropout by 1 / (kept fraction)."""

    def validate(self) -> None:
        super().validate()
        if self.init_weights not in (True, False, "lycoris"):
            raise ConfigError(f"init_weights must be True, False or 'lycoris', got {self.init_weights!r}")
        if not isinstance(self.decompose_factor, int) or (self.decompose_factor < 1 and self.decompose_factor != -1):
            raise ConfigError(f"decompose_factor must be -1 or an integer >= 1, got {self.decompose_factor!r}")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n: m = factor when it divides, else as close to sqrt as
    the factor allows (peft's and LyCORIS's rule, so shapes match theirs)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrDelta(DenseDelta):
    """dW = s (W1 ⊗ W2), reshaped to the base's canonical weight."""

    def __init__(self, info: LayerInfo, *, r: int, scale: float, factor: int, decompose_both: bool, effective: bool,
                 init: bool | str, rank_dropout: float, rescale: bool, **kw):  # fmt: skip
        super().__init__(info, **kw)
        self.scale, self.rank_dropout, self.rescale = scale, rank_dropout, rescale
        self.shape = weight_shape(info)
        kernel = tuple(self.shape[2:])
        (a, b), (c, d) = factorization(info.out_features, factor), factorization(self.shape[1], factor)
        if decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, c))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        if r >= max(b, d) / 2:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *kernel))
        elif effective and kernel:  # a core carries the kernel; Conv1d's gets a trailing 1
            core_kernel = kernel if len(kernel) == 2 else (kernel[0], 1)
            self.lokr_t2 = nn.Parameter(torch.empty(r, r, *core_kernel))
            self.lokr_w2_a = nn.Parameter(torch.empty(r, b))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, r))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d * math.prod(kernel)))
        for param in self.parameters():
            kaiming_(param)
        if init is True:  # W1 (or its first factor) at zero: identity
            nn.init.zeros_(self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a)
        elif init == "lycoris":  # W2 (or its second factor) at zero
            nn.init.zeros_(self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_b)

    def delta_weight(self) -> torch.Tensor:
        if hasattr(self, "lokr_w1"):
            w1 = self.lokr_w1.float()  # (a, c)
        else:
            w1 = self.lokr_w1_a.float() @ self.lokr_w1_b.float()
        if hasattr(self, "lokr_w2"):
            w2 = self.lokr_w2.float()  # (b, d, *k)
        elif hasattr(self, "lokr_t2"):  # mode products: (b, d, k1, k2)
            w2 = torch.einsum("ijkl,ip,jr->prkl", self.lokr_t2.float(), self.lokr_w2_a.float(), self.lokr_w2_b.float())
        else:
            w2 = self.lokr_w2_a.float() @ self.lokr_w2_b.float()  # (b, d * k...)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        # dense strides: torch.kron cannot view a size-1 dim with the odd stride einsum may leave there
        w2 = w2.clone(memory_format=torch.contiguous_format)
        return (torch.kron(w1.contiguous(), w2) * self.scale).reshape(self.shape)

    def train_delta_weight(self) -> torch.Tensor:
        weight = self.delta_weight()
        return drop_rows(weight, self.rank_dropout, rescale=self.rescale) if self.rank_dropout else weight


def build(config: LoKrConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place LoKrConfig is read."""
    if info.kind not in ("linear", "conv"):
        raise ConfigError(f"LoKr cannot adapt {module_name!r} (layer kind {info.kind!r}); use Linear or Conv layers")
    r, scale = config.rank_and_scale(module_name)
    effective = config.use_effective_conv2d and info.conv_ndim in (1, 2) and any(k != 1 for k in info.kernel_size)
    return LoKrDelta(
        info, r=r, scale=scale, factor=config.decompose_factor, decompose_both=config.decompose_both,
        effective=effective, init=config.init_weights, rank_dropout=config.rank_dropout,
        rescale=config.rank_dropout_scale, module_dropout=config.module_dropout,
    )  # fmt: skip


SPEC = TunerSpec(
    name="lokr",
    kind="delta",
    config=LoKrConfig,
    peft_type="LOKR",
    dispatch=("linear", "conv"),
    build=build,
    paper="https://arxiv.org/abs/2309.14859",
    contract_models=DENSE_CONTRACT_MODELS,
    example_configs=({"r": 1, "alpha": 2, "decompose_both": True, "use_effective_conv2d": True},),
)

"""C3A: dW = C(K) / in, C(K) a block matrix of b x b circulant blocks, each from one trained length-b kernel.

Chen et al. 2024, "Parameter-Efficient Fine-Tuning via Circular Convolution",
https://arxiv.org/abs/2407.19342. A circulant block is a circular convolution, applied with FFTs;
the update's rank is not bounded by the number of trained values (out * in / b per layer):

    dW[(i, :), (j, :)] = circulant(K[i, j]) / in,    K of shape (out / b, in / b, b)
    y = base(x) + x dW^T

peft's default `init_weights="xavier_uniform"` draws K at random (Xavier-uniform over in + out), so
a fresh adapter changes the output; `init_weights=True` starts at zero (identity). `block_size` must
divide both in and out (`block_size_pattern` overrides it per layer; a layer it does not divide gets
the largest common divisor, recorded in block_size_pattern so peft reads the same). Layer kinds: Linear and GPT-2
Conv1D (peft: Linear only). The kernel stays fp32.

File layout is peft's: "<module>.c3a_kernel", shaped (out / b, in / b, b).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.tuners.weight_delta import (
    DENSE_CONTRACT_MODELS,
    DenseDelta,
    check_positive_int,
    dotted_pattern_value,
    fit_per_layer,
    kaiming_,
)


@dataclass(kw_only=True)
class C3AConfig(TunerConfig):
    """Configuration of a C3A adapter (field names and meanings are peft's)."""

    tuner_name = "c3a"
    peft_type = "C3A"
    sidecar_fields = frozenset({"exclude_modules"})  # not a C3AConfig field in peft
    unsupported_peft_keys = {"bias": "none"}

    block_size: int = 256
    """Size b of each circulant block; must divide in_features and out_features."""
    block_size_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module block sizes: {regex on the name's tail: b}."""
    init_weights: bool | str = "xavier_uniform"
    """"xavier_uniform" (peft's default) / False, "gaussian", "kaiming_uniform": random; True: zero (identity)."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("block_size", self.block_size)
        if self.init_weights not in (True, False, "xavier_uniform", "gaussian", "kaiming_uniform"):
            raise ConfigError(
                f"init_weights must be True, False, 'xavier_uniform', 'gaussian' or 'kaiming_uniform', got {self.init_weights!r}"
            )


def circulant_blocks(kernel: torch.Tensor) -> torch.Tensor:
    """(m, n, b) kernels -> (m b, n b) matrix of circulant blocks: the block-circular convolution applied to I."""
    m, n, b = kernel.shape
    eye = torch.eye(n * b, dtype=kernel.dtype, device=kernel.device).reshape(n * b, n, b)
    mixed = torch.einsum("knb,mnb->kmb", torch.fft.ifft(eye), torch.fft.fft(kernel))  # (n b, m, b)
    return torch.fft.fft(mixed).real.flatten(start_dim=1).T  # (m b, n b)


class C3ADelta(DenseDelta):
    def __init__(self, info: LayerInfo, *, block: int, init: bool | str):
        super().__init__(info)
        out, fan_in = info.out_features, info.in_features
        self.c3a_kernel = nn.Parameter(torch.zeros(out // block, fan_in // block, block))
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.c3a_kernel)
            elif init in ("xavier_uniform", False):
                bound = math.sqrt(3.0) * math.sqrt(2.0 / (fan_in + out))
                nn.init.uniform_(self.c3a_kernel, -bound, bound)
            elif init == "kaiming_uniform":
                kaiming_(self.c3a_kernel)

    def delta_weight(self) -> torch.Tensor:
        return circulant_blocks(self.c3a_kernel.float()) / self.info.in_features  # (out, in)


def build(config: C3AConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place C3AConfig is read."""
    if info.kind != "linear":
        raise ConfigError(f"C3A adapts linear layers only; {module_name!r} is a {info.kind} layer")
    block = int(dotted_pattern_value(config.block_size_pattern, module_name, config.block_size))
    if info.in_features % block or info.out_features % block:
        raise ConfigError(
            f"C3A block_size={block} must divide in_features={info.in_features} and out_features={info.out_features} "
            f"of {module_name!r}; pick a common divisor (or set block_size_pattern for this layer)"
        )
    return C3ADelta(info, block=block, init=config.init_weights)


def prepare(model: nn.Module, config: C3AConfig, targets: list[str]) -> C3AConfig:
    """A block size that does not divide a layer becomes its largest common divisor with the layer's sizes,
    written into block_size_pattern (with a warning) so that peft reads the same."""
    pattern = fit_per_layer(
        model, targets, config.block_size_pattern, config.block_size,
        lambda b, info: math.gcd(b, info.in_features, info.out_features),
    )  # fmt: skip
    if pattern == config.block_size_pattern:
        return config
    warnings.warn("C3A: block_size does not divide some layers; they use a common divisor", stacklevel=2)
    return config.replace(block_size_pattern=pattern)


SPEC = TunerSpec(
    name="c3a",
    kind="delta",
    config=C3AConfig,
    peft_type="C3A",
    dispatch=("linear",),
    build=build,
    prepare=prepare,
    paper="https://arxiv.org/abs/2407.19342",
    identity_at_init=False,  # peft's default init draws the kernels at random
    contract_models=DENSE_CONTRACT_MODELS,
    example_configs=({"block_size": 2},),
)

"""FourierFT: dW = alpha * Re(IDFT2(F)), F zero except at n fixed random frequencies holding trained values c.

Gao et al. 2024, "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform",
https://arxiv.org/abs/2405.03003. The update of an (out, in) weight is dense, but it is described by
only n spectral coefficients (`n_frequency`), so the trained values per layer do not grow with r or
the layer's width:

    F[j_k, i_k] = c_k  (k = 1..n),   dW = alpha * Re(ifft2(F)),   y = base(x) + x dW^T

The n positions (j_k, i_k) are the first n entries of a permutation of the out * in positions drawn
from a CPU generator seeded with `random_loc_seed`, exactly as peft draws them, so they are not
saved. A layer with fewer than n weights gets all of them (recorded in n_frequency_pattern, so peft
reads the same sizes). peft's default `init_weights=False` draws c from N(0, 1): a fresh adapter then changes the
output (identity only with init_weights=True, c = 0). Layer kinds: Linear and GPT-2 Conv1D.

File layout is peft's: one vector "<module>.fourierft_spectrum" of n values per target.
"""

from __future__ import annotations

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
)


@dataclass(kw_only=True)
class FourierFTConfig(TunerConfig):
    """Configuration of a FourierFT adapter (field names and meanings are peft's)."""

    tuner_name = "fourierft"
    peft_type = "FOURIERFT"
    unsupported_peft_keys = {"bias": "none"}

    n_frequency: int = 1000
    """Trained spectral coefficients n per layer (at most in * out)."""
    scaling: float = 150.0
    """alpha: the update's scale (the paper uses 100-300)."""
    random_loc_seed: int = 777
    """Seed of the frequency positions; adapters are only portable between runs with the same seed."""
    fan_in_fan_out: bool = False
    """Kept for peft's files; GPT-2 Conv1D layers are read in the canonical (out, in) layout."""
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module n overrides: {regex on the name's tail: n}."""
    init_weights: bool = False
    """False (peft's default): c ~ N(0, 1), not the identity. True: c = 0, identity at init."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("n_frequency", self.n_frequency)
        if not isinstance(self.scaling, (int, float)) or isinstance(self.scaling, bool):
            raise ConfigError(f"scaling must be a number, got {self.scaling!r}")
        if not isinstance(self.n_frequency_pattern, dict):
            raise ConfigError(f"n_frequency_pattern must be a dict {{regex: n}}, got {self.n_frequency_pattern!r}")


class FourierDelta(DenseDelta):
    def __init__(self, info: LayerInfo, *, n: int, scaling: float, seed: int, init: bool):
        super().__init__(info)
        out, fan_in = info.out_features, info.in_features
        flat = torch.randperm(out * fan_in, generator=torch.Generator().manual_seed(seed))[:n]
        self.register_buffer("rows", flat // fan_in, persistent=False)  # (n,)
        self.register_buffer("cols", flat % fan_in, persistent=False)  # (n,)
        self.scaling = scaling
        self.fourierft_spectrum = nn.Parameter(torch.zeros(n) if init else torch.randn(n))

    def delta_weight(self) -> torch.Tensor:
        spectrum = self.fourierft_spectrum.float()
        dense = spectrum.new_zeros(self.info.out_features, self.info.in_features)
        dense = dense.index_put((self.rows, self.cols), spectrum)  # (out, in), n non-zeros
        return torch.fft.ifft2(dense).real * self.scaling


def build(config: FourierFTConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place FourierFTConfig is read."""
    if info.kind != "linear":
        raise ConfigError(f"FourierFT adapts linear layers only; {module_name!r} is a {info.kind} layer")
    n = int(dotted_pattern_value(config.n_frequency_pattern, module_name, config.n_frequency))
    if n > info.in_features * info.out_features:
        raise ConfigError(
            f"n_frequency={n} exceeds the {info.in_features * info.out_features} weights of {module_name!r}; lower it"
        )
    return FourierDelta(info, n=n, scaling=config.scaling, seed=config.random_loc_seed, init=config.init_weights)


def prepare(model: nn.Module, config: FourierFTConfig, targets: list[str]) -> FourierFTConfig:
    """Layers with fewer weights than n_frequency get all of them, written into n_frequency_pattern
    (with a warning) so that peft reads the same sizes."""
    pattern = fit_per_layer(
        model, targets, config.n_frequency_pattern, config.n_frequency,
        lambda n, info: min(n, info.in_features * info.out_features),
    )  # fmt: skip
    if pattern == config.n_frequency_pattern:
        return config
    warnings.warn("FourierFT: some layers have fewer than n_frequency weights and use all of them", stacklevel=2)
    return config.replace(n_frequency_pattern=pattern)


SPEC = TunerSpec(
    name="fourierft",
    kind="delta",
    config=FourierFTConfig,
    peft_type="FOURIERFT",
    dispatch=("linear",),
    build=build,
    prepare=prepare,
    paper="https://arxiv.org/abs/2405.03003",
    identity_at_init=False,  # peft's default init_weights=False draws the spectrum at random
    contract_models=DENSE_CONTRACT_MODELS,
    example_configs=({"n_frequency": 24, "scaling": 10.0},),
)

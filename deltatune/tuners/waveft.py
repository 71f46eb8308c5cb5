"""WaveFT: dW = alpha * IDWT2(S), S zero except at n fixed random positions of a wavelet coefficient map.

Bilican et al. 2025, "Exploring Sparsity for Parameter Efficient Fine Tuning Using Wavelets",
https://arxiv.org/abs/2505.12532. Like FourierFT, the trained values are n coefficients at seeded
random positions, but in a 2D wavelet domain, whose basis functions are local, so each trained
value changes a small patch of the weight:

    S[j_k, i_k] = c_k  (k = 1..n),   dW = alpha * IDWT2(S)   (one level; S's quadrants are the
    approximation and the horizontal / vertical / diagonal details),   y = base(x) + x dW^T

With `use_idwt=False`, dW = alpha * S (a scaled sparse update). The positions are peft's (a CPU
generator seeded with `random_loc_seed`) and are not saved. c starts at zero (identity at init).
Implemented wavelet: Haar ("db1"); peft's other families are refused with a message (they need
their filter banks and boundary handling, not ported here). `proportional_parameters` (n spread over
layers by size) is refused too. Layer kinds: Linear and GPT-2 Conv1D.

File layout is peft's: one vector "<module>.waveft_spectrum" of n values per target.
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
    fit_per_layer,
    pattern_value,
)


@dataclass(kw_only=True)
class WaveFTConfig(TunerConfig):
    """Configuration of a WaveFT adapter (field names and meanings are peft's)."""

    tuner_name = "waveft"
    peft_type = "WAVEFT"
    unsupported_peft_keys = {"bias": "none", "proportional_parameters": False}

    n_frequency: int = 2592
    """Trained wavelet coefficients n per layer (at most in * out)."""
    scaling: float = 25.0
    """alpha: the update's scale."""
    wavelet_family: str = "db1"
    """Only "db1" (Haar) is implemented."""
    use_idwt: bool = True
    """False: dW = alpha * S directly (no wavelet transform)."""
    random_loc_seed: int = 777
    """Seed of the coefficient positions."""
    fan_in_fan_out: bool = False
    """Kept for peft's files; GPT-2 Conv1D layers are read in the canonical (out, in) layout."""
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module n overrides: {regex on the name's tail: n}."""
    init_weights: bool = True
    """True: c = 0 (identity). False: N(0, 0.01^2) (tests only)."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("n_frequency", self.n_frequency)
        if self.wavelet_family != "db1" and self.use_idwt:
            raise ConfigError(
                f"wavelet_family={self.wavelet_family!r} is not implemented in deltatune; use 'db1' (Haar) or use_idwt=False"
            )
        if not isinstance(self.n_frequency_pattern, dict):
            raise ConfigError(f"n_frequency_pattern must be a dict {{regex: n}}, got {self.n_frequency_pattern!r}")


def haar_inverse(coefficients: torch.Tensor) -> torch.Tensor:
    """One-level inverse 2D Haar transform of an (H, W) map (H, W even) whose quadrants are
    [[approximation, horizontal detail], [vertical detail, diagonal detail]] (pywt's conventions)."""
    h, w = coefficients.shape[0] // 2, coefficients.shape[1] // 2
    ca, ch = coefficients[:h, :w], coefficients[:h, w:]
    cv, cd = coefficients[h:, :w], coefficients[h:, w:]
    out = coefficients.new_empty(2 * h, 2 * w)
    for p, sp in ((0, 1.0), (1, -1.0)):  # row parity: high-pass along rows flips sign on odd rows
        for q, sq in ((0, 1.0), (1, -1.0)):
            out[p::2, q::2] = (ca + sp * ch + sq * cv + sp * sq * cd) / 2
    return out


class WaveDelta(DenseDelta):
    def __init__(self, info: LayerInfo, *, n: int, scaling: float, seed: int, idwt: bool, init: bool):
        super().__init__(info)
        out, fan_in = info.out_features, info.in_features
        flat = torch.randperm(out * fan_in, generator=torch.Generator().manual_seed(seed))[:n]
        self.register_buffer("rows", flat // fan_in, persistent=False)
        self.register_buffer("cols", flat % fan_in, persistent=False)
        self.scaling, self.idwt = scaling, idwt
        self.waveft_spectrum = nn.Parameter(torch.zeros(n) if init else torch.randn(n) * 0.01)

    def delta_weight(self) -> torch.Tensor:
        out, fan_in = self.info.out_features, self.info.in_features
        values = self.waveft_spectrum.float()
        if not self.idwt:
            return values.new_zeros(out, fan_in).index_put((self.rows, self.cols), values) * self.scaling
        rows, cols = out + out % 2, fan_in + fan_in % 2  # padded to even sizes, the map centred in them
        top, left = (rows - out) // 2, (cols - fan_in) // 2
        dense = values.new_zeros(rows, cols).index_put((self.rows + top, self.cols + left), values)
        weight = haar_inverse(dense) * self.scaling
        return weight[top : top + out, left : left + fan_in]


def build(config: WaveFTConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place WaveFTConfig is read."""
    if info.kind != "linear":
        raise ConfigError(f"WaveFT adapts linear layers only; {module_name!r} is a {info.kind} layer")
    n = int(pattern_value(config.n_frequency_pattern, module_name, config.n_frequency))
    if n > info.in_features * info.out_features:
        raise ConfigError(
            f"n_frequency={n} exceeds the {info.in_features * info.out_features} weights of {module_name!r}; lower it"
        )
    return WaveDelta(
        info, n=n, scaling=config.scaling, seed=config.random_loc_seed, idwt=config.use_idwt, init=config.init_weights
    )


def prepare(model: nn.Module, config: WaveFTConfig, targets: list[str]) -> WaveFTConfig:
    """Layers with fewer weights than n_frequency get all of them, written into n_frequency_pattern
    (with a warning) so that peft reads the same sizes."""
    pattern = fit_per_layer(
        model, targets, config.n_frequency_pattern, config.n_frequency,
        lambda n, info: min(n, info.in_features * info.out_features), lookup=pattern_value,
    )  # fmt: skip
    if pattern == config.n_frequency_pattern:
        return config
    warnings.warn("WaveFT: some layers have fewer than n_frequency weights and use all of them", stacklevel=2)
    return config.replace(n_frequency_pattern=pattern)


SPEC = TunerSpec(
    name="waveft",
    kind="delta",
    config=WaveFTConfig,
    peft_type="WAVEFT",
    dispatch=("linear",),
    build=build,
    prepare=prepare,
    paper="https://arxiv.org/abs/2505.12532",
    contract_models=DENSE_CONTRACT_MODELS,
    example_configs=({"n_frequency": 12, "scaling": 5.0},),
)

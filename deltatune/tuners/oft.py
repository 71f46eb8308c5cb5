"""OFT: W' = W R^T, R = diag(R_1, ..., R_r) block-diagonal orthogonal, each R_i = Cayley(Q_i).

Qiu et al. 2023, https://arxiv.org/abs/2306.07280; the input-rotation form and Cayley-Neumann
parametrisation of Qiu et al. 2025 (OFTv2), https://arxiv.org/abs/2506.19847. Rotating the
neurons' weight vectors keeps their pairwise angles (hyperspherical energy), which the paper
argues preserves pretrained knowledge better than an additive update.

    y = base(x R)                      (linear: rotate the input; x of shape (..., in))
    Q_i = S_i - S_i^T                  skew-symmetric from b(b-1)/2 trained values (upper triangle)
    R_i = (I - Q_i)(I + Q_i)^{-1}      exact Cayley; with use_cayley_neumann (default) the series
                                       I + 2 Q + 2 Q^2 + ... + Q^{T-1}, T = num_cayley_neumann_terms

The trained values start at zero, so R = I and a fresh adapter is the identity; b (r(b-1)/2 values
per layer, r = in / b blocks) is `oft_block_size` (or `r` blocks). `block_share`: one block for all.
Convolutions rotate the flattened filter, W'_flat = W_flat R^T with W_flat of shape
(out, in/groups * k...); for Conv2d this is also what peft merges (peft adapts Conv2d only). (peft's *unmerged* Conv2d forward
rotates unfolded input patches and folds them back, which equals the merge only for 1x1 kernels;
ours always computes the merged form, so interop on k > 1 convolutions matches peft's merged model.)
Merge W' = W R^T; unmerge solves with R^T (R is orthogonal up to the Neumann truncation).

Not supported: `coft` (peft projects the parameters in place inside forward) is refused. peft 0.21
builds but never applies `module_dropout` in forward; it is accepted here and likewise has no effect.

File layout is peft's: "<module>.oft_R.weight", shaped (r, b(b-1)/2) ((1, ...) with block_share).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.tuners.weight_delta import (
    CONTRACT_MODELS,
    InputMap,
    check_positive_int,
    check_probability,
    weight_shape,
)


@dataclass(kw_only=True)
class OFTConfig(TunerConfig):
    """Configuration of an OFT adapter (field names and meanings are peft's)."""

    tuner_name = "oft"
    peft_type = "OFT"
    unsupported_peft_keys = {"coft": False, "bias": "none"}

    r: int = 0
    """Number of blocks per layer (0: derived from oft_block_size). Set exactly one of r and oft_block_size."""
    oft_block_size: int = 32
    """Size b of each orthogonal block (0: derived from r); adjusted to the nearest divisor of the input size."""
    module_dropout: float = 0.0
    """Accepted for peft's files; like peft 0.21, no dropout is applied."""
    init_weights: bool = True
    """True: R = I (identity). False: random rotations (tests only)."""
    block_share: bool = False
    """One block shared by all diagonal positions."""
    use_cayley_neumann: bool = True
    """Approximate the Cayley inverse by a truncated Neumann series (peft's default)."""
    num_cayley_neumann_terms: int = 5
    """Terms T of the Neumann series."""
    eps: float = 6e-5
    """COFT's constraint strength (only meaningful with coft, which is not supported)."""
    fan_in_fan_out: bool = False
    """Kept for peft's files; GPT-2 Conv1D layers are read in the canonical (out, in) layout."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r, allow_zero=True)
        check_positive_int("oft_block_size", self.oft_block_size, allow_zero=True)
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(
                f"set exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}); the other is "
                "in_features divided by it (e.g. OFTConfig(oft_block_size=32) or OFTConfig(r=8, oft_block_size=0))"
            )
        check_probability("module_dropout", self.module_dropout)
        check_positive_int("num_cayley_neumann_terms", self.num_cayley_neumann_terms)


def nearest_divisor(n: int, value: int) -> int:
    """peft's adjust_oft_parameters: the divisor of n closest to value (ties go down)."""
    if value >= n:
        return n
    higher = value
    while higher <= n and n % higher:
        higher += 1
    lower = value
    while lower > 1 and n % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def skew(values: torch.Tensor, size: int) -> torch.Tensor:
    """(blocks, size(size-1)/2) -> (blocks, size, size) skew-symmetric, filled row by row above the diagonal."""
    rows, cols = torch.triu_indices(size, size, 1, device=values.device)
    upper = values.new_zeros(values.shape[0], size, size)
    upper[:, rows, cols] = values
    return upper - upper.transpose(-2, -1)


def cayley(q: torch.Tensor, neumann_terms: int | None) -> torch.Tensor:
    """(blocks, b, b) skew-symmetric -> orthogonal: exact (I - Q)(I + Q)^{-1}, or peft's Neumann series."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if neumann_terms is None:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    out = eye.clone()
    if neumann_terms > 1:
        out = out + 2 * q
    if neumann_terms > 2:
        power = q @ q
        out = out + 2 * power
        for _ in range(3, neumann_terms - 1):
            power = power @ q
            out = out + 2 * power
        out = out + power @ q
    return out


class OFTRotation(nn.Module):
    """Holds peft's `oft_R.weight`: (blocks, b(b-1)/2)."""

    def __init__(self, blocks: int, size: int, init: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(blocks, size * (size - 1) // 2))
        if not init:
            nn.init.normal_(self.weight, std=0.1)


class OFTDelta(InputMap):
    def __init__(self, info: LayerInfo, *, n: int, size: int, share: bool, neumann_terms: int | None, init: bool):
        super().__init__(info)
        self.n, self.size, self.neumann_terms = n, size, neumann_terms
        self.oft_R = OFTRotation(1 if share else n // size, size, init)

    def input_map(self) -> torch.Tensor:
        blocks = cayley(skew(self.oft_R.weight.float(), self.size), self.neumann_terms)  # (r or 1, b, b)
        blocks = blocks.expand(self.n // self.size, -1, -1)
        return torch.block_diag(*blocks).T  # M = R^T: W' = W M, forward x -> x R


def build(config: OFTConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place OFTConfig is read."""
    if info.kind not in ("linear", "conv"):
        raise ConfigError(f"OFT cannot adapt {module_name!r} (layer kind {info.kind!r})")
    n = math.prod(weight_shape(info)[1:])  # in, or the flattened filter in/groups * k...
    if config.r == 0:
        size = nearest_divisor(n, config.oft_block_size)
        if size != config.oft_block_size:
            warnings.warn(
                f"{module_name}: oft_block_size {config.oft_block_size} -> {size} (a divisor of {n})", stacklevel=2
            )
    else:
        blocks = nearest_divisor(n, config.r)
        if blocks != config.r:
            warnings.warn(f"{module_name}: r {config.r} -> {blocks} (a divisor of {n})", stacklevel=2)
        size = n // blocks
    terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else None
    return OFTDelta(info, n=n, size=size, share=config.block_share, neumann_terms=terms, init=config.init_weights)


SPEC = TunerSpec(
    name="oft",
    kind="delta",
    config=OFTConfig,
    peft_type="OFT",
    dispatch=("linear", "conv"),
    build=build,
    paper="https://arxiv.org/abs/2306.07280",
    contract_models=CONTRACT_MODELS,
    example_configs=({"r": 2, "oft_block_size": 0, "use_cayley_neumann": False},),  # Neumann: interop tests
)

"""SHiRA: dW is sparse, r (in + out) trained entries of the (out, in) weight at fixed random positions.

Bhardwaj et al. 2024, "Sparse High Rank Adapters", https://arxiv.org/abs/2406.13175. The same budget
as a rank-r LoRA, spent on individual weights instead of low-rank factors: the update is high rank,
touches only 1-2% of the weights (so switching adapters rewrites few values), and

    dW[p_k] = w_k  (k = 1 .. r (in + out)),   y = base(x) + x dW^T

The positions p_k are the first r (in + out) entries of a permutation of the out * in positions from a
CPU generator (seeded with `random_seed`; unseeded, a fresh generator's fixed default seed, as in
peft), in row-major order; they are saved with the adapter (peft's "shira_indices"), so a loaded adapter
does not depend on the seed. w starts at zero (identity). Only peft's "random"
`mask_type` exists as a file format (a custom `mask_fn` is code, not data). Layer kinds: Linear and
GPT-2 Conv1D (peft: Linear only).

File layout is peft's: "<module>.shira_weight" (r (in + out) values) and "<module>.shira_indices"
(2, r (in + out)) int32 positions per target.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.tuners.weight_delta import DENSE_CONTRACT_MODELS, DenseDelta, check_positive_int


@dataclass(kw_only=True)
class ShiraConfig(TunerConfig):
    """Configuration of a SHiRA adapter (field names and meanings are peft's)."""

    tuner_name = "shira"
    peft_type = "SHIRA"
    sidecar_fields = frozenset(
        {"exclude_modules", "layers_to_transform", "layers_pattern"}
    )  # not in peft's ShiraConfig

    r: int = 32
    """Budget: r (in + out) trained weights per layer, as a rank-r LoRA."""
    mask_type: str = "random"
    """Only "random" (positions from random_seed)."""
    random_seed: int | None = None
    """Seed of the positions (None: a fresh generator's default seed, as peft)."""
    fan_in_fan_out: bool = False
    """Kept for peft's files; GPT-2 Conv1D layers are read in the canonical (out, in) layout."""
    init_weights: bool = True
    """True: zeros (identity). False: N(0, 1) (tests only)."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        if self.mask_type != "random":
            raise ConfigError(f"mask_type={self.mask_type!r}: only 'random' masks can be rebuilt from a saved adapter")
        if self.random_seed is not None:
            check_positive_int("random_seed", self.random_seed, allow_zero=True)


class ShiraDelta(DenseDelta):
    def __init__(self, info: LayerInfo, *, count: int, seed: int | None, init: bool):
        super().__init__(info)
        out, fan_in = info.out_features, info.in_features
        generator = torch.Generator()
        if seed is not None:
            generator.manual_seed(seed)
        flat = torch.randperm(out * fan_in, generator=generator)[:count].sort().values  # row-major order
        positions = torch.stack((flat // fan_in, flat % fan_in)).to(torch.int32)  # (2, count): rows, columns
        self.register_buffer("shira_indices", positions)  # saved, as peft does: a loaded adapter brings its own
        self.shira_weight = nn.Parameter(torch.zeros(count) if init else torch.randn(count))

    def delta_weight(self) -> torch.Tensor:
        weights = self.shira_weight.float()
        dense = weights.new_zeros(self.info.out_features, self.info.in_features)
        rows, cols = self.shira_indices.long()
        return dense.index_put((rows, cols), weights)  # (out, in), r (in + out) non-zeros


def build(config: ShiraConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place ShiraConfig is read."""
    if info.kind != "linear":
        raise ConfigError(f"SHiRA adapts linear layers only; {module_name!r} is a {info.kind} layer")
    count = config.r * (info.in_features + info.out_features)
    if count > info.in_features * info.out_features:
        raise ConfigError(
            f"SHiRA r={config.r} asks for {count} weights, more than the {info.in_features * info.out_features} of "
            f"{module_name!r}; lower r"
        )
    return ShiraDelta(info, count=count, seed=config.random_seed, init=config.init_weights)


def prepare(model: nn.Module, config: ShiraConfig, targets: list[str]) -> ShiraConfig:
    """An r asking for more weights than a target has (peft refuses it) is lowered to fit the smallest, with a warning."""
    from deltatune.backends import describe

    infos = [describe(getattr(m, "base_layer", m)) for m in map(model.get_submodule, targets)]
    fitting = min((i.in_features * i.out_features // (i.in_features + i.out_features) for i in infos), default=config.r)
    if config.r <= fitting or fitting < 1:
        return config
    warnings.warn(f"SHiRA r={config.r} asks for more weights than some targets have; using r={fitting}", stacklevel=2)
    return config.replace(r=fitting)


SPEC = TunerSpec(
    name="shira",
    kind="delta",
    config=ShiraConfig,
    peft_type="SHIRA",
    dispatch=("linear",),
    build=build,
    prepare=prepare,
    paper="https://arxiv.org/abs/2406.13175",
    contract_models=DENSE_CONTRACT_MODELS,
    example_configs=({"r": 1, "random_seed": 3},),
)

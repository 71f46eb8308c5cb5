"""BOFT: W' = s * (W B^T), B = M_m ... M_1 a product of butterfly-permuted block-diagonal rotations.

Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization",
https://arxiv.org/abs/2311.06243. OFT's single block-diagonal rotation only mixes features inside a
block; BOFT multiplies m = `boft_n_butterfly_factor` of them, each conjugated by a butterfly
permutation P_i, so the product mixes all features (a dense orthogonal B from few values):

    M_i = P_i diag(R_i1, ..., R_iD) P_i^T,   R_ij = (I - S)(I + S)^{-1},  S = (A_ij - A_ij^T) / 2
    y = s * (W (x B)) + b           (linear: rotate the input; s scales each output, b the base bias)

A (peft's `boft_R`, (m, D, b, b)) starts at zero and s (`boft_s`) at one, so a fresh adapter is the
identity. D = `boft_block_num` blocks of size b = `boft_block_size` (set one; D * b = in_features,
or in * k * k for Conv2d, whose flattened filter is rotated: W'_flat = s (W_flat B^T), the form
peft computes for convolutions too). `boft_dropout` (training only) replaces that fraction of the
blocks by identities. Merge is W' above; unmerge divides by s and solves with B^T.

peft without its CUDA extension (any CPU run) silently uses m = 1 whatever the config says; this
implementation applies the configured m everywhere, so a CPU peft and deltatune agree only for m = 1
(the default), which is what the interop tests cover. File layout is peft's: "<module>.boft_R"
(m, D, b, b) and "<module>.boft_s" ((out, 1) for linear layers, (1, out) for convolutions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.tuners.weight_delta import CONTRACT_MODELS, InputMap, check_positive_int, check_probability


@dataclass(kw_only=True)
class BOFTConfig(TunerConfig):
    """Configuration of a BOFT adapter (field names and meanings are peft's)."""

    tuner_name = "boft"
    peft_type = "BOFT"
    unsupported_peft_keys = {"bias": "none"}

    boft_block_size: int = 4
    """Size b of each orthogonal block (0: derived from boft_block_num). Set exactly one of the two."""
    boft_block_num: int = 0
    """Number of blocks D per butterfly factor (0: derived from boft_block_size)."""
    boft_n_butterfly_factor: int = 1
    """Butterfly factors m multiplied together (1: one block-diagonal rotation, as OFT)."""
    boft_dropout: float = 0.0
    """While training, this fraction of the blocks is replaced by identities."""
    init_weights: bool = True
    """True: identity at init. False: random rotations and scales (tests only)."""
    fan_in_fan_out: bool = False
    """Kept for peft's files; GPT-2 Conv1D layers are read in the canonical (out, in) layout."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("boft_block_size", self.boft_block_size, allow_zero=True)
        check_positive_int("boft_block_num", self.boft_block_num, allow_zero=True)
        check_positive_int("boft_n_butterfly_factor", self.boft_n_butterfly_factor)
        check_probability("boft_dropout", self.boft_dropout)
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ConfigError(
                f"set exactly one of boft_block_size ({self.boft_block_size}) and boft_block_num "
                f"({self.boft_block_num}); their product is the layer's input size"
            )


def block_sizes(n: int, size: int, num: int, factors: int, where: str) -> tuple[int, int]:
    """(block size b, block count D) for an input of size n, checked as peft checks them."""
    extra = factors - 1
    if size == 0:
        if n % num:
            raise ConfigError(f"{where}: input size {n} is not divisible by boft_block_num {num}")
        if extra and (extra > int(math.log2(num)) or num % 2**extra):
            raise ConfigError(f"{where}: boft_block_num {num} does not allow {factors} butterfly factors")
        size = n // num
    else:
        if n % size:
            raise ConfigError(f"{where}: input size {n} is not divisible by boft_block_size {size}")
        if extra and n % (size * 2**extra):
            raise ConfigError(f"{where}: boft_block_size {size} x 2^{extra} does not divide input size {n}")
    num = n // size
    if extra and (num % 2 or size % 2):
        raise ConfigError(f"{where}: with butterfly factors, block size {size} and count {num} must be even")
    return size, num


def butterfly_permutation(n: int, blocks: int, half: int, extra: int) -> torch.Tensor:
    """Index permutation of peft's block_butterfly_perm: inside each of `blocks` groups, the runs of
    `half` indices are reordered evens first, then odds."""
    if extra == 0:
        return torch.arange(n)
    group = n // blocks
    runs = group // half
    order = [pos for pos in range(0, runs, 2)] + [pos for pos in range(1, runs, 2)]
    inside = torch.cat([torch.arange(pos * half, pos * half + half) for pos in order])
    return torch.cat([start + inside for start in range(0, n, group)])


class BOFTDelta(InputMap):
    def __init__(self, info: LayerInfo, *, n: int, size: int, num: int, factors: int, dropout: float, init: bool):
        super().__init__(info)
        self.dropout = dropout
        perms = [butterfly_permutation(n, num // 2**i, size // 2, factors - 1) for i in range(factors)]
        self.register_buffer("perms", torch.stack(perms), persistent=False)  # (m, n)
        self.boft_R = nn.Parameter(torch.zeros(factors, num, size, size))
        scale_shape = (1, info.out_features) if info.kind == "conv" else (info.out_features, 1)
        self.boft_s = nn.Parameter(torch.ones(scale_shape))
        if not init:
            nn.init.normal_(self.boft_R, std=0.1)
            nn.init.normal_(self.boft_s, mean=1.0, std=0.1)

    def _blocks(self) -> torch.Tensor:
        m, d, b, _ = self.boft_R.shape
        a = self.boft_R.float().reshape(m * d, b, b)
        s = 0.5 * (a - a.transpose(1, 2))
        eye = torch.eye(b, device=a.device).expand_as(a)
        rot = torch.linalg.solve(eye + s, eye - s, left=False)  # (m*D, b, b)
        if self.training and self.dropout > 0:
            dropped = torch.randperm(m * d, device=a.device)[: int(self.dropout * m * d)]
            rot = rot.clone()
            rot[dropped] = torch.eye(b, device=a.device)
        return rot.view(m, d, b, b)

    def input_map(self) -> torch.Tensor:
        product = None
        for factor, perm in zip(self._blocks(), self.perms):
            diag = torch.block_diag(*factor)  # (n, n)
            moved = diag[perm][:, perm]  # P diag P^T with P[i, perm[i]] = 1
            product = moved if product is None else moved @ product
        return product.T  # M = B^T: W' = W M, forward x -> x B

    def output_scale(self) -> torch.Tensor:
        return self.boft_s.float().flatten()


def build(config: BOFTConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place BOFTConfig is read."""
    if info.kind == "conv":
        if info.conv_ndim != 2 or info.groups != 1 or len(set(info.kernel_size)) != 1:
            raise ConfigError(
                f"BOFT adapts Conv2d layers with square kernels and no groups; {module_name!r} is not one"
            )
        n = info.in_features * info.kernel_size[0] ** 2
    elif info.kind == "linear":
        n = info.in_features
    else:
        raise ConfigError(f"BOFT cannot adapt {module_name!r} (layer kind {info.kind!r})")
    factors = config.boft_n_butterfly_factor
    size, num = block_sizes(n, config.boft_block_size, config.boft_block_num, factors, module_name)
    return BOFTDelta(
        info, n=n, size=size, num=num, factors=factors, dropout=config.boft_dropout, init=config.init_weights
    )


SPEC = TunerSpec(
    name="boft",
    kind="delta",
    config=BOFTConfig,
    peft_type="BOFT",
    dispatch=("linear", "conv"),
    build=build,
    paper="https://arxiv.org/abs/2311.06243",
    contract_models=CONTRACT_MODELS,
    example_configs=(
        {"boft_block_size": 2, "boft_n_butterfly_factor": 2, "target_modules": r".*\.(q_proj|v_proj|c_attn)|conv2"},
    ),
)

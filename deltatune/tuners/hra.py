"""HRA: W' = W H, H = (I - 2 u_1 u_1^T) ... (I - 2 u_r u_r^T), a chain of r Householder reflections.

Yuan et al. 2024, "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation", https://arxiv.org/abs/2405.17484. Each u_i (unit-normalised column of the
trained U, (in, r)) reflects the input space; their product is orthogonal like OFT's rotation, and
r (in) values per layer make it as cheap as a rank-r LoRA.

    y = base(x H^T)                 (linear: act on the input; x of shape (..., in))

With `apply_GS` the columns are first orthonormalised (Gram-Schmidt) and H = I - 2 U U^T.
Initialisation (r even): the columns come in equal pairs, and two equal reflections cancel, so a
fresh adapter is the identity (peft warns and starts random for odd r). Convolutions (Conv2d, square
kernels) reflect the flattened filter: W'_flat = W_flat H with W_flat of shape (out, in * k * k).
Merge W' = W H; unmerge solves with H (H^{-1} = H^T, as peft applies the reflections in reverse).

File layout is peft's: "<module>.hra_u", shaped (in, r) or (in * k * k, r).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.tuners.weight_delta import CONTRACT_MODELS, InputMap, check_positive_int, kaiming_


@dataclass(kw_only=True)
class HRAConfig(TunerConfig):
    """Configuration of an HRA adapter (field names and meanings are peft's)."""

    tuner_name = "hra"
    peft_type = "HRA"
    unsupported_peft_keys = {"bias": "none"}

    r: int = 8
    """Number of Householder reflections per layer (even, for an identity start)."""
    apply_GS: bool = False
    """Orthonormalise the reflection vectors (Gram-Schmidt) before use."""
    init_weights: bool = True
    """True: pairs of equal vectors (identity for even r). False: random (tests only)."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)


def householder_chain(u: torch.Tensor, orthonormalise: bool) -> torch.Tensor:
    """(n, r) vectors -> (n, n) product of the reflections I - 2 v v^T, v = u_i / |u_i|, in column order."""
    n = u.shape[0]
    eye = torch.eye(n, device=u.device, dtype=u.dtype)
    if orthonormalise:
        q = []
        for i in range(u.shape[1]):
            v = u[:, i]
            for prev in q:
                v = v - (prev @ v) * prev
            q.append(v / v.norm())
        basis = torch.stack(q, dim=1)  # (n, r) orthonormal
        return eye - 2 * basis @ basis.T
    unit = u / u.norm(dim=0)
    out = eye
    for i in range(u.shape[1]):
        v = unit[:, i : i + 1]  # (n, 1)
        out = out - 2 * (out @ v) @ v.T
    return out


class HRADelta(InputMap):
    def __init__(self, info: LayerInfo, *, n: int, r: int, orthonormalise: bool, init: bool):
        super().__init__(info)
        self.orthonormalise = orthonormalise
        if init and r % 2 == 0:
            self.hra_u = nn.Parameter(torch.repeat_interleave(kaiming_(torch.zeros(n, r // 2)), 2, dim=1))
        else:
            self.hra_u = nn.Parameter(kaiming_(torch.empty(n, r)))

    def input_map(self) -> torch.Tensor:
        return householder_chain(self.hra_u.float(), self.orthonormalise)  # M = H: W' = W H


def build(config: HRAConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place HRAConfig is read."""
    if info.kind == "conv":
        if info.conv_ndim != 2 or info.groups != 1 or len(set(info.kernel_size)) != 1:
            raise ConfigError(f"HRA adapts Conv2d layers with square kernels and no groups; {module_name!r} is not one")
        n = info.in_features * info.kernel_size[0] ** 2
    elif info.kind == "linear":
        n = info.in_features
    else:
        raise ConfigError(f"HRA cannot adapt {module_name!r} (layer kind {info.kind!r})")
    if config.init_weights and config.r % 2:
        warnings.warn(f"HRA r={config.r} is odd: the adapter cannot start as the identity", stacklevel=2)
    return HRADelta(info, n=n, r=config.r, orthonormalise=config.apply_GS, init=config.init_weights)


SPEC = TunerSpec(
    name="hra",
    kind="delta",
    config=HRAConfig,
    peft_type="HRA",
    dispatch=("linear", "conv"),
    build=build,
    paper="https://arxiv.org/abs/2405.17484",
    contract_models=CONTRACT_MODELS,
    example_configs=({"r": 2, "target_modules": r".*\.(q_proj|v_proj|c_attn)|conv1|conv2|head"},),
)

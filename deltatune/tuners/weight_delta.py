"""Shared math for tuners whose update is a dense weight (LoHa, LoKr, FourierFT, OFT, HRA, ...).

Two shapes of update cover most of peft's methods:

- additive, `DenseDelta`:        y = base(x) + op(x, dW)      merge: W + dW,   unmerge: W' - dW
- multiplicative, `InputMap`:    y = base(x M^T)              merge: W M,      unmerge: W' M^{-1}
  with M acting on the (flattened) input dimension of W (OFT, BOFT, HRA rotate it). On a
  convolution the input of W is (in/groups * k...), which no input transform reaches, so there
  the update runs as the additive form with dW = W M - W.

`op` is the base layer's own operation (F.linear, or F.conv1d/2d/3d with the base's stride,
padding, dilation and groups), so a subclass only defines `delta_weight()` (fp32, in the base's
canonical layout (out, in/groups, *k)) or `input_map()`. Everything here sees tensors and plain
numbers only; a tuner's `build()` reads its config and passes numbers in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.wrapper import BaseCall

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

CONTRACT_MODELS = ("conv", "llama", "gpt2")
"""Tiny models the contract matrix runs these tuners on: Conv1d/Conv2d (and a Linear head), a real
decoder's Linear layers, GPT-2's transposed Conv1D (for tuners that read or rewrite the base weight
in a way of their own)."""
DENSE_CONTRACT_MODELS = ("conv", "llama")
"""For tuners that only add a dense dW through DenseDelta: GPT-2's transposed layout is the shared
merge path's (proven by the others), so these skip it to keep the matrix's time down."""


def weight_shape(info: LayerInfo) -> tuple[int, ...]:
    """The canonical weight shape of a layer: (out, in) or (out, in/groups, *kernel)."""
    if info.kind == "conv":
        return (info.out_features, info.in_features // info.groups, *info.kernel_size)
    return (info.out_features, info.in_features)


def apply_weight(x: torch.Tensor, weight: torch.Tensor, info: LayerInfo) -> torch.Tensor:
    """What the base layer computes with `weight` in place of its own and no bias."""
    if info.kind == "conv":
        return _CONV[info.conv_ndim](x, weight, None, info.stride, info.padding, info.dilation, info.groups)
    return F.linear(x, weight)  # (..., out)


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """peft's get_pattern_key: the first pattern matching the end of the dotted name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def dotted_pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """The stricter rule of peft's FourierFT and C3A: the first key with `.*\\.{key}$` matching."""
    key = next((k for k in patterns if re.match(rf".*\.{k}$", module_name)), None)
    return patterns[key] if key is not None else default


def fit_per_layer(
    model: nn.Module,
    targets: list[str],
    patterns: dict[str, Any],
    default: Any,
    fit: Callable[[Any, LayerInfo], Any],
    lookup: Callable[[dict[str, Any], str, Any], Any] = dotted_pattern_value,
) -> dict[str, Any]:
    """`patterns` plus an entry for each target whose value (by `lookup`, the tuner's peft rule) `fit` changes,
    keyed so that both of peft's rules select it (one needs a '.' before the key, so top-level modules keep theirs)."""
    from deltatune.backends import describe

    out = dict(patterns)
    for name in targets:
        module = model.get_submodule(name)
        info = describe(getattr(module, "base_layer", module))  # a layer another adapter already wraps
        value = lookup(out, name, default)
        fitted = fit(value, info)
        if "." in name and fitted != value:
            out[re.escape(name.split(".", 1)[1])] = fitted
    return out


def common_divisor(
    model: nn.Module, targets: list[str], value: int, sizes: Callable[[LayerInfo], tuple[int, ...]]
) -> int:
    """The largest divisor of `value` that divides `sizes(info)` of every target (for a field peft applies to all
    layers alike, such as a group or vector length)."""
    from deltatune.backends import describe

    for name in targets:
        module = model.get_submodule(name)
        value = math.gcd(value, *sizes(describe(getattr(module, "base_layer", module))))
    return value


def share_across_layers(
    model: nn.Module, adapter_name: str, targets: list[str], tensors: dict[str, torch.Tensor], *, persistent: bool
) -> None:
    """Register the same tensors as buffers of every delta of an adapter (VeRA's and RandLoRA's random
    projections): one tensor, so it is saved once (see model_level_keys) and a load fills every layer."""
    deltas = [model.get_submodule(name).deltas[adapter_name] for name in targets]
    device = next(deltas[0].parameters()).device
    for name, tensor in tensors.items():
        shared = tensor.to(device)
        for delta in deltas:
            delta.register_buffer(name, shared, persistent=persistent)


def model_level_keys(*names: str, per_layer: bool = False) -> Callable[..., dict[str, torch.Tensor]]:
    """A TunerSpec.file_keys: a shared tensor with one of these leaf names is filed at peft's model level,
    "base_model.<name>", and, with `per_layer` (peft's RandLoRA writes both), under every target as well."""

    def rename(tensors: dict[str, torch.Tensor], targets: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in tensors.items():
            leaf = key.rpartition(".")[2]
            if leaf not in names:
                out[key] = value
                continue
            out[f"base_model.{leaf}"] = value
            # copies (a file holds no shared memory); loading fills the real tensor through the model-level key
            out.update({f"{target}.{leaf}": value.detach().clone() for target in targets} if per_layer else {})
        return out

    return rename


def check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def check_probability(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise ConfigError(f"{name} must be in [0, 1), got {value!r}")


def kaiming_(tensor: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init (peft's kaiming_uniform_(a=sqrt(5))), on a bare tensor."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


class DenseDelta(nn.Module):
    """An additive update given as a dense weight: y = base(x) + op(x, dW).

    `module_dropout`: while training, the whole update is skipped with this probability (LyCORIS);
    `dropout`: dropout on the update's input only (the frozen path is never dropped).
    """

    def __init__(self, info: LayerInfo, *, module_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.info, self.module_dropout = info, module_dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """dW in the base's canonical layout, fp32."""
        raise NotImplementedError

    def train_delta_weight(self) -> torch.Tensor:
        """dW as used in a training forward (rank dropout and the like); default: dW."""
        return self.delta_weight()

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        result = base(x)
        if self.training and self.module_dropout and torch.rand(1).item() <= self.module_dropout:
            return result
        delta = self.train_delta_weight() if self.training else self.delta_weight()
        return result + apply_weight(self.dropout(x), delta.to(x.dtype), self.info).to(result.dtype)

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight + self.delta_weight().to(weight), bias, None

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None, _ctx: object):
        return weight - self.delta_weight().to(weight), bias


class InputMap(nn.Module):
    """A multiplicative update on the input side of W: W' = W_flat M, M of size (n, n), n = W_flat.shape[1].

    Linear layers run it on the activations, y = base(x M^T), which also works on quantized bases.
    Convolutions run y = base(x) + op(x, W' - W) with the base's dense weight.
    """

    def __init__(self, info: LayerInfo):
        super().__init__()
        self.info = info

    def input_map(self) -> torch.Tensor:
        """M, (n, n), fp32."""
        raise NotImplementedError

    def output_scale(self) -> torch.Tensor | None:
        """Optional per-output factor s (out,): W' = s * (W_flat M) (BOFT's boft_s)."""
        return None

    def transform(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.reshape(weight.shape[0], -1)  # (out, n)
        out = flat @ self.input_map().to(flat)
        scale = self.output_scale()
        if scale is not None:
            out = out * scale.to(out).view(-1, 1)
        return out.view(weight.shape)

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        if self.info.kind == "linear":
            mapped = base(x @ self.input_map().to(x.dtype).T)  # (..., in) -> (..., out)
            scale = self.output_scale()
            if scale is None:
                return mapped
            bias = base.bias
            if bias is None:
                return mapped * scale.to(mapped.dtype)
            return (mapped - bias.to(mapped.dtype)) * scale.to(mapped.dtype) + bias.to(mapped.dtype)
        weight = base.weight().float()
        delta = self.transform(weight) - weight
        result = base(x)
        return result + apply_weight(x, delta.to(x.dtype), self.info).to(result.dtype)

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None):
        return self.transform(weight), bias, None

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None, _ctx: object):
        flat = weight.reshape(weight.shape[0], -1)
        scale = self.output_scale()
        if scale is not None:
            flat = flat / scale.to(flat).view(-1, 1)
        matrix = self.input_map().to(flat)
        restored = torch.linalg.solve(matrix, flat, left=False)  # flat M^{-1}
        return restored.view(weight.shape), bias


@dataclass(kw_only=True)
class LycorisConfig(TunerConfig):
    """Fields LoHa and LoKr share (peft's LycorisConfig and their common fields)."""

    r: int = 8
    """Rank of each factor."""
    alpha: float = 8
    """Numerator of the update scale alpha / r."""
    rank_dropout: float = 0.0
    """While training, each output row of the update is dropped with this probability."""
    module_dropout: float = 0.0
    """While training, the whole update of a layer is skipped with this probability."""
    use_effective_conv2d: bool = False
    """Convolutions with a kernel > 1: factor the kernel through a small core tensor (FedPara's Proposition 3)."""
    init_weights: bool | str = True
    """True: the update starts at zero (identity). False: random (tests only)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex on the name's tail: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides: {regex on the name's tail: alpha}."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool):
            raise ConfigError(f"alpha must be a number, got {self.alpha!r}")
        check_probability("rank_dropout", self.rank_dropout)
        check_probability("module_dropout", self.module_dropout)
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a dict {{regex: value}}, got {getattr(self, name)!r}")

    def rank_and_scale(self, module_name: str) -> tuple[int, float]:
        r = int(pattern_value(self.rank_pattern, module_name, self.r))
        return r, float(pattern_value(self.alpha_pattern, module_name, self.alpha)) / r


@dataclass(kw_only=True)
class SharedProjectionConfig(TunerConfig):
    """Fields of the tuners whose layers share seeded random projections (VeRA, PVeRA, RandLoRA)."""

    projection_prng_key: int = 0
    """Seed of the random projections every adapted layer shares."""
    save_projection: bool = True
    """Save the shared projections with the adapter; False rebuilds them from the seed on load."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("projection_prng_key", self.projection_prng_key, allow_zero=True)


def drop_rows(weight: torch.Tensor, p: float, rescale: bool) -> torch.Tensor:
    """LyCORIS rank dropout: zero whole output rows of dW with probability p (rescaled to keep the mean)."""
    keep = (torch.rand(weight.shape[0], device=weight.device) > p).to(weight.dtype)
    if rescale:
        keep = keep / keep.mean().clamp_min(1e-12)
    return weight * keep.view(-1, *[1] * (weight.dim() - 1))

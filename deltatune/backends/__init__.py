"""Read and write a base layer's dense weight, whatever layer type holds it.

Tuners see weights in one canonical layout per kind:
- linear:    (out_features, in_features)   nn.Linear, GPT-2 Conv1D (stored transposed), bnb layers
- embedding: (num_embeddings, embedding_dim)
- conv:      (out_channels, in_channels // groups, *kernel)

`describe(layer)` is a first-match dispatch over `BACKENDS`; a layer no backend knows is not
targetable. Quantized backends live in their own module and register themselves here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class LayerInfo:
    """What a tuner may know about a base layer (plain numbers, no module)."""

    kind: str
    in_features: int
    out_features: int
    conv_ndim: int = 0
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    fan_in_fan_out: bool = False
    """True when the stored weight is (in, out), as in GPT-2's Conv1D."""
    quantized: str | None = None
    """"4bit" / "8bit" for bitsandbytes layers, else None."""
    padding_idx: int | None = None


class Backend(Protocol):
    def matches(self, layer: nn.Module) -> bool: ...
    def info(self, layer: nn.Module) -> LayerInfo: ...
    def read_weight(self, layer: nn.Module) -> torch.Tensor: ...
    def write_weight(self, layer: nn.Module, weight: torch.Tensor) -> None: ...


class _Dense:
    """Shared read/write for layers whose `.weight` is a plain dense tensor."""

    transposed = False

    def read_weight(self, layer: nn.Module) -> torch.Tensor:
        weight = layer.weight.detach()
        return weight.T if self.transposed else weight

    def write_weight(self, layer: nn.Module, weight: torch.Tensor) -> None:
        target = layer.weight
        value = weight.T if self.transposed else weight
        if value.shape != target.shape:
            raise ValueError(f"weight shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value.to(target.dtype))


class LinearBackend(_Dense):
    def matches(self, layer: nn.Module) -> bool:
        return isinstance(layer, nn.Linear)

    def info(self, layer: nn.Module) -> LayerInfo:
        return LayerInfo("linear", layer.in_features, layer.out_features)


class GPT2Conv1DBackend(_Dense):
    """transformers' Conv1D: y = x @ W + b with W stored as (in, out)."""

    transposed = True

    def matches(self, layer: nn.Module) -> bool:
        return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and layer.weight.dim() == 2

    def info(self, layer: nn.Module) -> LayerInfo:
        in_features, out_features = layer.weight.shape
        return LayerInfo("linear", in_features, out_features, fan_in_fan_out=True)


class EmbeddingBackend(_Dense):
    def matches(self, layer: nn.Module) -> bool:
        return isinstance(layer, nn.Embedding)

    def info(self, layer: nn.Module) -> LayerInfo:
        return LayerInfo("embedding", layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx)


class ConvBackend(_Dense):
    def matches(self, layer: nn.Module) -> bool:
        return isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))

    def info(self, layer: nn.Module) -> LayerInfo:
        return LayerInfo(
            "conv",
            layer.in_channels,
            layer.out_channels,
            conv_ndim=layer.weight.dim() - 2,
            kernel_size=tuple(layer.kernel_size),
            stride=tuple(layer.stride),
            padding=layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
            dilation=tuple(layer.dilation),
            groups=layer.groups,
        )


# First match wins: quantized backends are inserted at the front (they subclass nn.Linear).
BACKENDS: list[Backend] = [GPT2Conv1DBackend(), LinearBackend(), EmbeddingBackend(), ConvBackend()]


def register_backend(backend: Backend, *, first: bool = True) -> None:
    if any(type(b) is type(backend) for b in BACKENDS):
        return
    BACKENDS.insert(0 if first else len(BACKENDS), backend)


def backend_for(layer: nn.Module) -> Backend | None:
    for backend in BACKENDS:
        if backend.matches(layer):
            return backend
    return None


def describe(layer: nn.Module) -> LayerInfo | None:
    """LayerInfo for a targetable layer, or None."""
    backend = backend_for(layer)
    return backend.info(layer) if backend else None


def read_weight(layer: nn.Module) -> torch.Tensor:
    backend = backend_for(layer)
    if backend is None:
        raise TypeError(f"no weight backend for {type(layer).__name__}")
    return backend.read_weight(layer)


def write_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    backend = backend_for(layer)
    if backend is None:
        raise TypeError(f"no weight backend for {type(layer).__name__}")
    backend.write_weight(layer, weight)


def is_linear_like(layer: nn.Module) -> bool:
    info = describe(layer)
    return info is not None and info.kind == "linear"


def prepare_for_training(model: nn.Module) -> None:
    """Let each layer's backend make it safe to backpropagate through (optional `prepare_for_training`)."""
    for module in model.modules():
        hook = getattr(backend_for(module), "prepare_for_training", None)
        if hook is not None:
            hook(module)


def _register_optional_backends() -> None:
    """bitsandbytes layers get backends when the package is installed; it is not imported here."""
    if importlib.util.find_spec("bitsandbytes") is not None:
        from deltatune.backends.bnb import BNB_BACKENDS

        for backend in BNB_BACKENDS:
            register_backend(backend)


_register_optional_backends()

from deltatune.backends.mha import MultiheadAttentionBackend  # noqa: E402 - needs LayerInfo above

register_backend(MultiheadAttentionBackend(), first=False)

"""The delta wrapper: a base layer plus named deltas, and the modules-to-save wrapper.

A delta is an nn.Module with
    forward(x, base) -> y          `base` is a BaseCall: call it for the rest of the chain
    merge(weight, bias) -> (weight, bias, ctx)      pure functions on dense fp32 tensors in the
    unmerge(weight, bias, ctx) -> (weight, bias)    backend's canonical layout; `ctx` is whatever
                                                    the delta needs to undo its merge (DoRA: the norm)
Active deltas compose as a chain: y = d_k(x, d_{k-1}(., ... d_1(., base_layer))). LoRA adds to
what the chain returns; IA3 scales it (or scales x before calling it).

A delta may instead *replace* some of the base layer's own parameters (BitFit, LN-tuning, ...): it
has `overrides() -> {param name: tensor}` and no forward of its own. The base layer then runs with
those tensors in place of its own (torch.func.functional_call; the base parameters are untouched),
at the bottom of the chain. Merging it copies the tensors into the base layer and keeps the
originals, so unmerge restores them exactly; replaced parameters are merged before (under) any
chained delta.

Merging is only ever an explicit call (never a side effect of train()/eval()).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from deltatune import backends
from deltatune.backends import LayerInfo


class MergeError(RuntimeError):
    """A merge would have produced non-finite weights; the base layer was left untouched."""


class QuantizedMergeError(MergeError):
    """A merge into quantized (4-bit / 8-bit) storage was refused; nothing was changed."""


class BaseCall:
    """What a delta sees of the layer below it: call it, or read its dense weight and bias."""

    __slots__ = ("_fn", "_wrapper", "_args", "_kwargs", "_overrides")

    def __init__(self, wrapper: DeltaWrapper, fn: Callable[..., torch.Tensor] | None, args, kwargs, overrides=None):
        self._wrapper, self._fn, self._args, self._kwargs = wrapper, fn, args, kwargs
        self._overrides: dict[str, torch.Tensor] = overrides or {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._fn is not None:
            return self._fn(x)
        if self._overrides:
            return functional_call(self._wrapper.base_layer, self._overrides, (x, *self._args), self._kwargs)
        return self._wrapper.base_layer(x, *self._args, **self._kwargs)

    @property
    def info(self) -> LayerInfo | None:
        """None for layers no weight backend knows (e.g. norm layers, whose parameters are replaced)."""
        return self._wrapper.layer_info

    def weight(self) -> torch.Tensor:
        """Dense base weight in canonical layout (dequantized for quantized layers)."""
        return backends.read_weight(self._wrapper.base_layer)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self._wrapper.base_layer, "bias", None)

    def then(self, delta: nn.Module) -> BaseCall:
        """This call with one more delta on top."""
        return BaseCall(self._wrapper, lambda x, below=self: delta(x, below), (), {})


class DeltaWrapper(nn.Module):
    """Holds the original layer as `base_layer` and a dict of named deltas."""

    def __init__(self, base_layer: nn.Module, layer_info: LayerInfo):
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.layer_info = layer_info
        self.active: list[str] = []
        self.merged: list[str] = []
        self._undo: dict[str, object] = {}
        self.disabled = False

    # Attribute access falls through to the base layer (weight, in_features, ...), as with peft.
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        call = BaseCall(self, None, args, kwargs)
        if not self.disabled:
            for name in self.active:
                if name not in self.merged and name in self.deltas:
                    call = call.then(self.deltas[name])
        elif self.merged:
            raise RuntimeError("adapters are merged into this layer; unmerge them before disabling adapters")
        return call(x)

    # -- merge ----------------------------------------------------------------------------------
    def _merged(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, object]]:
        base = self.base_layer
        weight = backends.read_weight(base).float()
        bias = base.bias.detach().float() if getattr(base, "bias", None) is not None else None
        undo: dict[str, object] = {}
        for name in names:
            weight, bias, undo[name] = self.deltas[name].merge(weight, bias)
        return weight, bias, undo

    def _pending(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if n in self.deltas and n not in self.merged]

    def check_merge(self, names: Iterable[str]) -> None:
        """Raise MergeError if merging would give non-finite weights; changes nothing."""
        pending = self._pending(names)
        if not pending:
            return
        weight, bias, _ = self._merged(pending)
        if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
            raise MergeError(f"merging adapter(s) {pending} gives non-finite weights; the base was left untouched")

    def merge(self, names: Iterable[str], *, safe: bool = True) -> None:
        pending = self._pending(names)
        if not pending:
            return
        if self.layer_info.quantized:  # requantizing would add error silently, and unmerge could not undo it
            raise QuantizedMergeError(
                f"refusing to merge adapter(s) {pending} into {self.layer_info.quantized} storage; "
                "use merge_and_unload(dequantize=True) for a dense merged model"
            )
        if safe:
            self.check_merge(pending)
        weight, bias, undo = self._merged(pending)
        self._write(weight, bias)
        self.merged.extend(pending)
        self._undo.update(undo)

    def unmerge(self) -> None:
        if not self.merged:
            return
        base = self.base_layer
        weight = backends.read_weight(base).float()
        bias = base.bias.detach().float() if getattr(base, "bias", None) is not None else None
        for name in reversed(self.merged):
            weight, bias = self.deltas[name].unmerge(weight, bias, self._undo.pop(name))
        self._write(weight, bias)
        self.merged.clear()

    def _write(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        backends.write_weight(self.base_layer, weight)
        if bias is not None:
            with torch.no_grad():
                self.base_layer.bias.copy_(bias.to(self.base_layer.bias.dtype))

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}"


class ModulesToSave(nn.Module):
    """A module trained in full per adapter: `original_module` stays frozen, each adapter has a copy."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original_module":
                raise
            return getattr(self.original_module, name)

    def add(self, adapter_name: str) -> nn.Module:
        copy_ = copy.deepcopy(self.original_module)
        for param in copy_.parameters():
            param.requires_grad_(True)
        self.modules_to_save[adapter_name] = copy_
        return copy_

    def current(self) -> nn.Module:
        if self.disabled or self.active is None or self.active not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)

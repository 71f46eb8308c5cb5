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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from deltatune import backends
from deltatune.backends import LayerInfo


class MergeError(RuntimeError, ValueError):
    """A merge would have produced non-finite weights (or has no weight-space form); the base layer was left
    untouched. Also a ValueError, which is what peft raises for a broken merge, so peft users' handlers catch it."""


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
    def info(self) -> LayerInfo:
        return self._wrapper.layer_info

    def plain_linear(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias) when this call is a plain nn.Linear with no hooks, overrides or extra
        arguments, else None. Then `F.linear(x, weight, bias)` is exactly what calling it computes,
        into a fresh tensor nobody else holds, which a delta may add into in place."""
        if self._fn is not None or self._overrides or self._args or self._kwargs:
            return None
        layer = self._wrapper._modules["base_layer"]  # the hot path: no nn.Module.__getattr__
        if type(layer) is not nn.Linear or layer._forward_hooks or layer._forward_pre_hooks:
            return None
        params = layer._parameters
        if "weight" not in params or "bias" not in params or params["weight"] is None:
            return None  # weight or bias moved out of the parameters (some quantizers do that)
        return params["weight"], params["bias"]

    def weight(self) -> torch.Tensor:
        """Dense base weight in canonical layout (dequantized for quantized layers)."""
        return backends.read_weight(self._wrapper.base_layer)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self._wrapper.base_layer, "bias", None)

    def call_with(self, x: torch.Tensor, replaced: dict[str, torch.Tensor]) -> torch.Tensor:
        """Call the base layer with some of its own tensors replaced (by name, as in its state dict): for a
        delta on a layer that reads its weights directly instead of calling submodules (MultiheadAttention).
        Only the bottom delta of a chain can do this."""
        if self._fn is not None:
            raise RuntimeError(
                f"{type(self._wrapper.base_layer).__name__}: an adapter that replaces the layer's weights cannot "
                "run on top of another active adapter on the same layer; activate one of them at a time"
            )
        return functional_call(self._wrapper.base_layer, {**self._overrides, **replaced}, (x, *self._args), self._kwargs)

    @property
    def output_scale(self) -> torch.Tensor | float | None:
        """The base layer's own output multiplier (Gemma-style scaled embeddings: `embed_scale`), else None."""
        return getattr(self._wrapper.base_layer, "embed_scale", None)

    @property
    def call_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The wrapped layer's other arguments (after x), for deltas that run a whole block."""
        return self._args, self._kwargs

    def then(self, delta: nn.Module) -> BaseCall:
        """This call with one more delta on top."""
        return BaseCall(self._wrapper, lambda x, below=self: delta(x, below), self._args, self._kwargs)


def replaces_parameters(delta: nn.Module) -> bool:
    """True for a delta that replaces base parameters (has `overrides()`) instead of chaining."""
    return callable(getattr(type(delta), "overrides", None))  # on the class: no nn.Module.__getattr__ miss


class ParamOverride(nn.Module):
    """Per-adapter copies of some of a base layer's own parameters, used in their place.

    Copies are registered under their parameter names, below `store_as` when given (a file-key
    layout choice: peft's LN-tuning saves "<module>.ln_tuning_layers.<param>"). One copy may be
    registered in several ParamOverrides when the base tensor is tied across modules.
    """

    def __init__(self, copies: dict[str, nn.Parameter], store_as: str = ""):
        super().__init__()
        holder: nn.Module = self
        if store_as:
            holder = nn.Module()
            self.add_module(store_as, holder)
        for name, param in copies.items():
            holder.register_parameter(name, param)
        self._holder = store_as
        self._names = list(copies)

    def overrides(self) -> dict[str, torch.Tensor]:
        holder = self.get_submodule(self._holder) if self._holder else self
        return {name: getattr(holder, name) for name in self._names}


class Passthrough(nn.Module):
    """An empty slot inserted into a layer list: returns its first input unchanged.

    A "structural" tuner's deltas fill it (DeltaWrapper(Passthrough(...))); disabled or inactive, the
    slot computes nothing. Attribute reads fall through to `template` (the layer the slot follows,
    held unregistered), so model code reading e.g. `layer.attention_type` still works.
    """

    def __init__(self, template: nn.Module):
        super().__init__()
        self.__dict__["template"] = template

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            template = self.__dict__.get("template")
            if template is None:
                raise
            return getattr(template, name)

    def forward(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        return hidden_states


_INPUT_KEYWORDS = ("hidden_states", "x", "input", "inputs", "query")

BASE_ROW = "__base__"
"""The adapter name peft uses, in `adapter_names`, for rows that get the base model."""


class RowAdapters:
    """Which adapter each row of a batch runs with (peft's `adapter_names`; BASE_ROW: none).

    Set on every wrapper for the length of one forward / generate call. In generate, a batch that
    generate expanded (num_return_sequences or beams: each row repeated `expand` times in place) gets
    each name `expand` times; any other batch size is an error (a layer whose input has no batch rows
    cannot give rows different adapters).
    """

    def __init__(self, names: Sequence[str], expand: int = 1):
        self.names, self.expand = list(names), expand
        self._groups: dict[tuple[int, str], list[tuple[str, torch.Tensor]]] = {}

    def groups(
        self, batch: int, device: torch.device, layer: str = "", *, activations: bool = False
    ) -> list[tuple[str, torch.Tensor]]:
        """[(adapter name, row indices)] for a batch of `batch` rows, in first-seen order.

        `activations`: the rows are float activations, which models may fold batch-major (Swin's windows,
        (B, T, d) flattened to (B * T, d)), so a multiple of the batch is read as each row repeated."""
        key = (batch, str(device))
        found = self._groups.get(key)
        if found is None:
            count = len(self.names)
            folded = activations and batch % count == 0
            if batch not in (count, count * self.expand) and not folded:
                where = f" (an adapter changes {layer}, whose input has {batch} leading rows)" if layer else ""
                raise ValueError(
                    f"adapter_names has {count} entries but the batch has {batch} rows{where}; give one adapter "
                    "name per row, or run each adapter's rows in a batch of their own (set_adapter)"
                )
            repeat = batch // count
            rows: dict[str, list[int]] = {}
            for i, name in enumerate(self.names):
                rows.setdefault(name, []).extend(range(i * repeat, (i + 1) * repeat))
            found = [(name, torch.tensor(idx, dtype=torch.long, device=device)) for name, idx in rows.items()]
            self._groups[key] = found
        return found


class DeltaWrapper(nn.Module):
    """Holds the original layer as `base_layer` and a dict of named deltas."""

    def __init__(self, base_layer: nn.Module, layer_info: LayerInfo):
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.layer_info = layer_info
        """kind "other" for a layer no weight backend knows; only replacing deltas sit on those."""
        self.active: list[str] = []
        self.merged: list[str] = []
        """Merge order: replacing deltas first, then chained ones (the order of the unmerged forward)."""
        self._undo: dict[str, object] = {}
        self._replaced: dict[str, dict[str, torch.Tensor]] = {}
        """Base values a merged replacing delta overwrote, per adapter, for an exact unmerge."""
        self.disabled = False
        self.rows: RowAdapters | None = None
        """Set during a call with `adapter_names`: each row then runs with its own adapter."""

    # Attribute access falls through to the base layer (weight, in_features, ...), as with peft.
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled:
            if self.merged:
                raise RuntimeError("adapters are merged into this layer; unmerge them before disabling adapters")
            return self.base_layer(*args, **kwargs)
        if self.rows is not None:
            return self._forward_rows(self.rows, args, kwargs)
        return self._forward_with(self.active, args, kwargs)

    def _forward_with(self, active: list[str], args: tuple, kwargs: dict[str, Any]) -> Any:
        deltas = self._modules["deltas"]._modules  # the hot path: no nn.Module.__getattr__
        overrides: dict[str, torch.Tensor] = {}
        chained = []
        for name in active:
            delta = deltas.get(name)
            if delta is None or name in self.merged:
                continue
            if replaces_parameters(delta):
                overrides.update(delta.overrides())
            else:
                chained.append(delta)
        if not chained:  # whatever the base layer takes (some take no tensor at all)
            if overrides:
                return functional_call(self.base_layer, overrides, args, kwargs)
            return self.base_layer(*args, **kwargs)
        if args:
            x, rest = args[0], args[1:]
        else:  # called with keywords only (diffusers does this): take its input by the usual names
            key = next((k for k in _INPUT_KEYWORDS if k in kwargs), None)
            if key is None:
                raise TypeError(
                    f"{type(self.base_layer).__name__} was called with keyword arguments only ({sorted(kwargs)}); "
                    "an adapter there needs its input tensor. Target a module that takes its input positionally."
                )
            kwargs = dict(kwargs)
            x, rest = kwargs.pop(key), ()
        call = BaseCall(self, None, rest, kwargs, overrides)
        for delta in chained[:-1]:
            call = call.then(delta)
        return chained[-1](x, call)  # = call.then(chained[-1])(x), one frame less

    def _forward_rows(self, rows: RowAdapters, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Each row with its own adapter (or the base): the base layer runs once over the whole batch,
        each adapter's delta over its rows only, reusing their slice of the base output."""
        if self.merged:
            raise RuntimeError("adapters are merged into this layer; unmerge them before using adapter_names")
        deltas = self._modules["deltas"]._modules
        if not any(name in deltas for name in rows.names):
            return self.base_layer(*args, **kwargs)
        x = args[0] if args else None
        layer = type(self.base_layer).__name__
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise ValueError(
                f"adapter_names: an adapter changes {layer}, which takes no batched tensor input, so rows cannot "
                "differ there; run each adapter's rows in a batch of their own (set_adapter)"
            )
        groups = rows.groups(x.shape[0], x.device, layer, activations=x.is_floating_point())
        used = [(name, idx) for name, idx in groups if name in deltas]
        if len(groups) == 1:
            return self._forward_with([used[0][0]], args, kwargs)
        if args[1:] or kwargs:  # other arguments may be batched too: run whole batches, keep each group's rows
            out = self._forward_with([], args, kwargs)
            if not isinstance(out, torch.Tensor) or out.shape[:1] != x.shape[:1]:
                raise ValueError(f"adapter_names: {type(self.base_layer).__name__} does not return one row per input row")
            out = out.clone()
            for name, idx in used:
                out.index_copy_(0, idx, self._forward_with([name], args, kwargs).index_select(0, idx))
            return out
        base = self.base_layer
        full = base(x)  # (B, ..., out)
        out = full.clone()
        for name, idx in used:
            delta, xg = deltas[name], x.index_select(0, idx)
            if replaces_parameters(delta):
                yg = functional_call(self.base_layer, delta.overrides(), (xg,))
            else:
                fg = full.index_select(0, idx)  # the group's base output, unless the delta feeds the base another x
                yg = delta(xg, BaseCall(self, lambda t, xg=xg, fg=fg: fg if t is xg else base(t), (), {}))
            out.index_copy_(0, idx, yg.to(out.dtype))
        return out

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

    def _split(self, names: Iterable[str]) -> tuple[list[str], list[str]]:
        """(replacing, chained) in the given order."""
        names = list(names)
        replacing = [n for n in names if replaces_parameters(self.deltas[n])]
        return replacing, [n for n in names if n not in replacing]

    def check_merge(self, names: Iterable[str]) -> None:
        """Raise MergeError if merging would give non-finite weights; changes nothing."""
        replacing, chained = self._split(self._pending(names))
        for name in replacing:
            if not all(torch.isfinite(t).all() for t in self.deltas[name].overrides().values()):
                raise MergeError(f"adapter {name!r} holds non-finite values; the base was left untouched")
        if not chained:
            return
        weight, bias, _ = self._merged(chained)
        if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
            raise MergeError(f"merging adapter(s) {chained} gives non-finite weights; the base was left untouched")

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
        if self.merged and self._split(pending)[0]:  # replaced parameters go under merged chained deltas
            pending = self.merged + pending
            self.unmerge()
        replacing, chained = self._split(pending)
        for name in replacing:
            self._replace(name)
        if chained:
            weight, bias, undo = self._merged(chained)
            self._write(weight, bias)
            self.merged.extend(chained)
            self._undo.update(undo)

    def _replace(self, name: str) -> None:
        own = dict(self.base_layer.named_parameters(recurse=False))
        saved: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for key, value in self.deltas[name].overrides().items():
                saved[key] = own[key].detach().clone()
                own[key].copy_(value)
        self._replaced[name] = saved
        self.merged.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            return
        replacing, chained = self._split(self.merged)
        if chained:
            base = self.base_layer
            weight = backends.read_weight(base).float()
            bias = base.bias.detach().float() if getattr(base, "bias", None) is not None else None
            for name in reversed(chained):  # a refusal here (MergeError) leaves the layer merged as it was
                weight, bias = self.deltas[name].unmerge(weight, bias, self._undo.get(name))
            self._write(weight, bias)
            for name in chained:
                self._undo.pop(name, None)
        own = dict(self.base_layer.named_parameters(recurse=False))
        with torch.no_grad():
            for name in reversed(replacing):
                for key, value in self._replaced.pop(name).items():
                    own[key].copy_(value)
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
        self.rows: RowAdapters | None = None
        """Set during a call with `adapter_names`: each row then runs with its own adapter's copy."""

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
        if self.rows is None or self.disabled:
            return self.current()(*args, **kwargs)
        copies = self.modules_to_save._modules
        if not any(name in copies for name in self.rows.names):
            return self.original_module(*args, **kwargs)
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        layer = type(self.original_module).__name__
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise ValueError(
                f"adapter_names: an adapter trains {layer} in full, which takes no batched tensor input, so rows "
                "cannot differ there; run each adapter's rows in a batch of their own (set_adapter)"
            )
        groups = self.rows.groups(x.shape[0], x.device, layer, activations=x.is_floating_point())
        used = [(name, idx) for name, idx in groups if name in copies]
        out = self.original_module(*args, **kwargs)
        whole = isinstance(out, torch.Tensor) and out.shape[:1] == x.shape[:1]
        if not whole:
            raise ValueError(f"adapter_names: {type(self.original_module).__name__} does not return one row per input row")
        out = out.clone()
        sliced = len(args) == 1 and not kwargs  # else other arguments may be batched too: whole batches
        for name, idx in used:
            if sliced:
                rows = copies[name](x.index_select(0, idx))
            else:
                rows = copies[name](*args, **kwargs).index_select(0, idx)
            out.index_copy_(0, idx, rows.to(out.dtype))
        return out

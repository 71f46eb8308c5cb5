"""LLaMA-Pro block expansion: insert identity-initialized copies of decoder blocks; train only those.

    h_{i+1} = B_i(h_i) for the original blocks (frozen);  after every (N / M)-th block a new block
    B'(h) = h + Attn'(norm'(h)) + MLP'(norm'(h + ...)),  a copy of the block before it with its
    output projections (o_proj, down_proj) set to zero, so B'(h) = h at init.

Wu et al. 2024, https://arxiv.org/abs/2401.02415. With N original blocks and M = `num_new_blocks`,
the blocks are split into M groups of equal size and one new block follows each group, so the
expanded model has N + M blocks and the model is unchanged at init. Only the new blocks train (all
their parameters); the original ones stay frozen, which preserves the base model's skills while the
new blocks absorb new-domain knowledge. In the expanded model every block's `self_attn.layer_idx`
is its position and `config.num_hidden_layers` is N + M, so the KV cache has a slot per block and
generation with a cache works; unload()/delete_adapter restore both.

A "structural" tuner: each new block sits in an inserted slot of the decoder-layer list; disabled
(or inactive) the slot passes its input through. Saved files hold only the new blocks, under the
keys an expanded checkpoint would use ("model.layers.<position>.self_attn.q_proj.weight", ...);
loading inserts the slots again and fills them. Supported on Llama-style models (a `layers` list of
blocks with self_attn.o_proj and mlp.down_proj, called as layer(hidden_states, **kwargs) and
returning a tensor). Not mergeable: merge_adapter refuses it (unload() removes the new blocks).
Several LLaMA-Pro adapters share slots; activate one at a time (each block holds one cache slot).
Add LLaMA-Pro before other adapters (blocks are copied as the base model has them).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.inject import user_view
from deltatune.core.registry import TunerSpec
from deltatune.core.wrapper import BaseCall, DeltaWrapper, Passthrough

ZEROED = ("self_attn.o_proj", "mlp.down_proj")


@dataclass(kw_only=True)
class LlamaProConfig(TunerConfig):
    """Configuration of LLaMA-Pro block expansion."""

    tuner_name = "llama_pro"
    peft_type = "LLAMA_PRO"

    num_new_blocks: int = 1
    """M: new blocks, one after each of M equal groups of the original blocks (N must be >= M)."""

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.num_new_blocks, int) or isinstance(self.num_new_blocks, bool) or self.num_new_blocks < 1:
            raise ConfigError(f"num_new_blocks must be an integer >= 1, got {self.num_new_blocks!r}")
        if self.target_modules is not None:
            raise ConfigError("LLaMA-Pro adds whole blocks and takes no target_modules; set num_new_blocks instead")


# ---------------------------------------------------------------------------------------------
# The new block: a copy of a decoder layer run on the slot's input with the layer's own arguments.
# ---------------------------------------------------------------------------------------------
class ExpandedBlock(nn.Module):
    """A decoder-layer copy whose submodules are registered directly here, so its keys are the
    layer's own ("self_attn.q_proj.weight", ...)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        for name, param in layer.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.__dict__["layer"] = layer  # unregistered: its children are ours

    def train(self, mode: bool = True) -> ExpandedBlock:
        self.__dict__["layer"].train(mode)
        return super().train(mode)

    def forward(self, x: torch.Tensor, base: BaseCall) -> Any:
        args, kwargs = base.call_args
        return self.__dict__["layer"](base(x), *args, **kwargs)


def find_layer_list(model: nn.Module) -> str:
    """Path of the Llama-style decoder-layer list; ConfigError saying why when there is none."""
    lists = [(name, module) for name, module in user_view(model) if isinstance(module, nn.ModuleList) and len(module)]
    for name, layers in lists:
        first = layers[0]
        if name.rpartition(".")[2] == "layers" and all(_has(first, path) for path in ZEROED):
            return name
    found = [f"{name} ({type(layers[0]).__name__})" for name, layers in lists][:10]
    raise ConfigError(
        f"LLaMA-Pro expands a Llama-style decoder-layer list (a ModuleList named 'layers' whose blocks have "
        f"{' and '.join(ZEROED)}); {type(model).__name__} has none (layer lists here: {found or 'none'})"
    )


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def slots(model: nn.Module, config: LlamaProConfig) -> tuple[str, list[int]]:
    path = find_layer_list(model)
    count = sum(1 for m in model.get_submodule(path) if not _is_slot(m))
    new = config.num_new_blocks
    if new > count:
        raise ConfigError(f"num_new_blocks={new} exceeds the {count} decoder blocks of this model")
    return path, [round((k + 1) * count / new) - 1 for k in range(new)]  # last block of each group


def build(config: LlamaProConfig, template: nn.Module, slot_name: str) -> nn.Module:
    if any(isinstance(m, DeltaWrapper) for m in template.modules()):
        raise ConfigError(
            f"{slot_name}: the block to copy already holds adapter layers; add LLaMA-Pro before other adapters"
        )
    layer = copy.deepcopy(template)
    with torch.no_grad():
        for path in ZEROED:
            for param in layer.get_submodule(path).parameters():
                param.zero_()  # output projections at zero: the block starts as the identity
    for param in layer.parameters():
        param.requires_grad_(True)
    return ExpandedBlock(layer)


# ---------------------------------------------------------------------------------------------
# Layer bookkeeping: every block's layer_idx is its position; the config counts every block.
# ---------------------------------------------------------------------------------------------
_ORIGINAL: weakref.WeakKeyDictionary[nn.Module, tuple[int, list[str] | None]] = weakref.WeakKeyDictionary()
"""Per decoder-layer list: the config's num_hidden_layers and layer_types before any expansion."""


def _is_slot(module: nn.Module) -> bool:
    return isinstance(module, DeltaWrapper) and isinstance(module.base_layer, Passthrough)


def renumber(model: nn.Module, path: str) -> None:
    layers = model.get_submodule(path)
    config = model.config.get_text_config(decoder=True) if hasattr(model, "config") else None
    if config is None:
        raise ConfigError("LLaMA-Pro needs a transformers model with a config (num_hidden_layers)")
    if layers not in _ORIGINAL:
        types = getattr(config, "layer_types", None)
        _ORIGINAL[layers] = (config.num_hidden_layers, list(types) if types is not None else None)
    count, types = _ORIGINAL[layers]
    for position, entry in enumerate(layers):
        slot = _is_slot(entry)
        blocks = [d.__dict__["layer"] for d in entry.deltas.values()] if slot else [getattr(entry, "base_layer", entry)]
        for block in blocks:
            attention = getattr(block, "self_attn", None)
            if attention is not None and hasattr(attention, "layer_idx"):
                attention.layer_idx = position
    positions = [i for i, entry in enumerate(layers) if not _is_slot(entry)]
    owners = [max(j for j, p in enumerate(positions) if p <= i) for i in range(len(layers))]  # block a slot follows
    config.num_hidden_layers = count + len(layers) - len(positions)
    if types is not None:
        config.layer_types = [types[j] for j in owners]
    if len(positions) == len(layers):
        del _ORIGINAL[layers]


def connect(model: nn.Module, config: LlamaProConfig, adapter_name: str, targets: list[str]) -> Callable[[], None]:
    path = targets[0].rpartition(".")[0]
    renumber(model, path)
    return lambda: renumber(model, path)


SPEC = TunerSpec(
    name="llama_pro",
    kind="structural",
    config=LlamaProConfig,
    peft_type="LLAMA_PRO",
    slots=slots,
    build=build,
    connect=connect,
    mergeable=False,
    paper="https://arxiv.org/abs/2401.02415",
    example_configs=({"num_new_blocks": 2},),
)

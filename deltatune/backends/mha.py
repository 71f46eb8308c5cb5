"""torch.nn.MultiheadAttention as one weight: its input projection and output projection stacked.

MultiheadAttention never calls its projections as modules: its forward reads `in_proj_weight`
(3E, E: query, key and value rows) and `out_proj.weight` (E, E) directly. Tuners therefore see one
canonical weight of shape (4E, E) = [in_proj_weight; out_proj.weight], read and written here, and
change the layer's output by calling it with replaced tensors (BaseCall.call_with). Only the
shared-embedding form (`_qkv_same_embed_dim`, kdim == vdim == embed_dim) has an `in_proj_weight`;
the other form is not targetable (as in peft).
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.backends import LayerInfo


class MultiheadAttentionBackend:
    def matches(self, layer: nn.Module) -> bool:
        return isinstance(layer, nn.MultiheadAttention) and getattr(layer, "in_proj_weight", None) is not None

    def info(self, layer: nn.Module) -> LayerInfo:
        return LayerInfo("mha", layer.embed_dim, 4 * layer.embed_dim)

    def read_weight(self, layer: nn.Module) -> torch.Tensor:
        return torch.cat([layer.in_proj_weight.detach(), layer.out_proj.weight.detach()])  # (4E, E)

    def write_weight(self, layer: nn.Module, weight: torch.Tensor) -> None:
        embed = layer.embed_dim
        if tuple(weight.shape) != (4 * embed, embed):
            raise ValueError(f"weight shape {tuple(weight.shape)} does not fit ({4 * embed}, {embed})")
        with torch.no_grad():
            layer.in_proj_weight.copy_(weight[: 3 * embed].to(layer.in_proj_weight.dtype))
            layer.out_proj.weight.copy_(weight[3 * embed :].to(layer.out_proj.weight.dtype))

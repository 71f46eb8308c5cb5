"""Prefix tuning: learned keys and values put in front of every attention layer's own.

Li & Liang 2021, https://arxiv.org/abs/2101.00190. For each layer l, with hidden states h:

    K_l = [Pk_l ; W_k h],   V_l = [Pv_l ; W_v h],   Pk_l, Pv_l in R^{V x (heads * head_dim)}

All 2 * L prefixes come from one table P in R^{V x (L * 2 * token_dim)}, optionally produced by a
two-layer MLP from a smaller table (`prefix_projection`, the paper's reparameterization):
P = W2 tanh(W1 E + b1) + b2. The prefixes enter through the model's KV cache (a transformers
`DynamicCache`; an `EncoderDecoderCache` whose decoder self-attention holds the prefix for
encoder-decoder models), the attention mask grows by V ones, and explicit position ids move by V; the
logits cover only the real tokens, so labels are unchanged. Grouped-query models get prefixes with
num_key_value_heads heads (peft's rule). The cache layout, including which table rows feed which
decoder layer of an encoder-decoder model, is peft's, so the same file gives the same outputs.

Not identity at init (`identity_at_init=False`: random prefixes are attended to; init_weights="zero"
gives zero keys/values, which still take softmax weight). Nothing to merge (`mergeable=False`).
Needs a model whose forward takes a KV cache, and no gradient checkpointing (as in peft). Saved as
peft does: "prompt_embeddings" of shape (V, L * 2 * token_dim), after the projection if any.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.core.config import ConfigError
from deltatune.core.registry import TunerSpec
from deltatune.tuners import prompt_learning as pl


@dataclass(kw_only=True)
class PrefixTuningConfig(pl.PromptLearningConfig):
    """Configuration of prefix tuning (field names and meanings are peft's)."""

    tuner_name = "prefix_tuning"
    peft_type = "PREFIX_TUNING"

    init_weights: str | None = None
    """None: random prefixes (N(0, 1)); "zero": zero keys and values (zero last projection layer)."""
    encoder_hidden_size: int | None = None
    """Hidden width of the projection MLP; the model's token_dim when None."""
    prefix_projection: bool = False
    """Produce the prefixes with a two-layer MLP from a (V, token_dim) table instead of learning them directly."""

    def validate(self) -> None:
        super().validate()
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f'init_weights must be None or "zero", got {self.init_weights!r}')
        hidden = self.encoder_hidden_size
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0):
            raise ConfigError(f"encoder_hidden_size must be a positive int or None (token_dim), got {hidden!r}")
        if not isinstance(self.prefix_projection, bool):
            raise ConfigError(f"prefix_projection must be True or False, got {self.prefix_projection!r}")
        if self.token_dim and self.num_attention_heads and self.token_dim % self.num_attention_heads:
            raise ConfigError(
                f"token_dim={self.token_dim} is not a multiple of num_attention_heads={self.num_attention_heads}: "
                "each prefix is split into heads of equal width"
            )


def build_input(model: nn.Module, config: PrefixTuningConfig, for_loading: bool) -> nn.Module:
    """The only place PrefixTuningConfig is read."""
    v, dim, layers = config.num_virtual_tokens, config.token_dim, config.num_layers
    width = layers * 2 * dim
    zero = config.init_weights == "zero"
    if for_loading or not config.prefix_projection:
        module = pl.PromptTable(v, width, num_virtual_tokens=v, init=torch.zeros(v, width) if zero else None)
    else:
        hidden = config.encoder_hidden_size
        mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        if zero:
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)
        module = pl.EncodedTable(v, dim, mlp, num_virtual_tokens=v)
    # plain numbers the cache layout needs (layers, heads, width, transformer submodules)
    module.prefix_layout = (layers, config.num_attention_heads, dim, config.num_transformer_submodules)
    weight = next(model.parameters(), None)
    return module.to(weight.device) if weight is not None else module


def prepare(model: nn.Module, config: PrefixTuningConfig, _targets: list[str]) -> PrefixTuningConfig:
    """Fill the model's sizes (KV heads for grouped-query attention) and refuse models without a KV cache."""
    config = config.replace(**pl.fill_from_model(model, config, "prefix tuning"))
    sizes = pl.model_config(model, "prefix tuning").to_dict()
    if sizes.get("num_key_value_heads") is not None:
        head_dim = sizes.get("head_dim") or config.token_dim // config.num_attention_heads
        kv_heads = sizes["num_key_value_heads"]
        config = config.replace(token_dim=head_dim * kv_heads, num_attention_heads=kv_heads)
    if config.encoder_hidden_size is None:
        config = config.replace(encoder_hidden_size=config.token_dim)
    if pl.cache_key(model) is None:
        raise ConfigError(
            f"prefix tuning feeds its prefixes through the model's KV cache, but {type(model).__name__}.forward takes "
            "no cache / past_key_values argument; use prompt tuning or P-tuning for this model"
        )
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise ConfigError("prefix tuning does not work with gradient checkpointing (the prefix lives in the KV cache)")
    pl.check_position_limit(model, config.num_virtual_tokens, "prefix tuning")
    return config


def prefix_cache(model: nn.Module, module: nn.Module, batch_size: int) -> Any:
    """The prefixes as a transformers cache, laid out exactly as peft lays them out."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    layers, heads, dim, submodules = module.prefix_layout
    table = pl.table_rows(module, batch_size)  # (B, V, L * 2 * dim)
    v = table.shape[1]
    dtype = getattr(model, "dtype", None)
    past = table.to(dtype or table.dtype)
    past = past.reshape(batch_size, v, layers * 2, heads, dim // heads)  # (B, V, 2L, H, hd)
    if submodules == 2:
        past = torch.cat([past, past], dim=2)  # (B, V, 4L, H, hd)
    per_layer = past.permute(2, 0, 3, 1, 4).split(submodules * 2)  # L x (2S, B, H, V, hd)
    if submodules == 1:
        return DynamicCache([(kv[0], kv[1]) for kv in per_layer])
    # decoder self-attention gets rows (0, 1) of each group; the cross-attention cache starts empty
    return EncoderDecoderCache(DynamicCache([(kv[0], kv[1]) for kv in per_layer]), DynamicCache())


def _batch_size(kwargs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise ConfigError("prefix tuning needs input_ids or inputs_embeds to know the batch size")


def prepare_inputs(model: nn.Module, kwargs: dict[str, Any], module: nn.Module, stage: str) -> dict[str, Any]:
    """Put the prefix cache in (forward; the first generate step), grow the (decoder) self-attention mask."""
    kwargs = dict(kwargs)
    if stage == "generate":
        return kwargs
    v, key = module.num_virtual_tokens, pl.cache_key(model)
    mask_key = "decoder_attention_mask" if pl.is_encoder_decoder(model) else "attention_mask"
    mask = kwargs.get(mask_key)
    if mask is not None:
        if mask.dim() != 2:
            raise ConfigError("prefix tuning needs a 2D attention mask (no static/compiled cache)")
        kwargs[mask_key] = torch.cat((torch.ones(mask.shape[0], v, dtype=mask.dtype, device=mask.device), mask), dim=1)
    if kwargs.get("token_type_ids") is not None:
        kwargs.pop("token_type_ids")
    if stage == "step":
        kwargs.pop("position_ids", None)  # positions follow the cache, which holds the prefix
        cache = kwargs.get(key)
        if cache is not None and cache.get_seq_length() > 0:
            return kwargs
    elif kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + v
    kwargs.pop("past_key_values", None)
    kwargs[key] = prefix_cache(model, module, _batch_size(kwargs))
    return kwargs


SPEC = TunerSpec(
    name="prefix_tuning",
    kind="input",
    config=PrefixTuningConfig,
    peft_type="PREFIX_TUNING",
    build_input=build_input,
    prepare=prepare,
    prepare_inputs=prepare_inputs,
    mergeable=False,
    identity_at_init=False,
    paper="https://arxiv.org/abs/2101.00190",
    example_configs=({"num_virtual_tokens": 3},),
)

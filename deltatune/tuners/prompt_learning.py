"""Virtual tokens: what prompt tuning, P-tuning and prefix tuning share (not a tuner itself).

These "input" tuners leave every weight of the model alone and rewrite its inputs instead:

    prompt / P-tuning:  inputs_embeds = [P ; E(input_ids)],  P in R^{V x d}   (V virtual tokens)
    prefix tuning:      K_l = [Pk_l ; W_k h],  V_l = [Pv_l ; W_v h]          (per layer l, via the KV cache)

and extend the attention mask by V ones (and, where logits cover the virtual tokens, the labels by V
times -100). The trained tensors live in one small module per adapter on the TunedModel. Its saved
form is peft's: one tensor "prompt_embeddings", the resolved table of virtual tokens (for P-tuning and
projected prefixes that is the encoder's *output*, so a loaded adapter is a plain table and cannot
recover the encoder that produced it; peft does the same).

Configuration fields and their defaults read from the model (`token_dim`, `num_layers`,
`num_attention_heads`, `num_transformer_submodules`, `encoder_hidden_size`) follow peft's
`PromptLearningConfig`, so adapter files cross between the two libraries.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.core.config import ConfigError, TunerConfig

FILE_KEY = "prompt_embeddings"
_MODULE_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


@dataclass(kw_only=True)
class PromptLearningConfig(TunerConfig):
    """Fields shared by the virtual-token tuners (peft's PromptLearningConfig)."""

    sidecar_fields = frozenset(_MODULE_FIELDS)
    run_defaults = {"num_virtual_tokens": 20}

    num_virtual_tokens: int | None = None
    """Number of virtual tokens V (required, > 0)."""
    token_dim: int | None = None
    """Width of a virtual token; read from the model (hidden size) when left None."""
    num_transformer_submodules: int | None = None
    """1 for decoder-only models, 2 for encoder-decoder ones (read from task_type when None)."""
    num_attention_heads: int | None = None
    """Attention heads of the model (read from the model when None)."""
    num_layers: int | None = None
    """Transformer layers of the model (read from the model when None)."""

    def validate(self) -> None:
        super().validate()
        for name in _MODULE_FIELDS:
            if getattr(self, name) is not None:
                raise ConfigError(
                    f"{type(self).__name__}.{name}={getattr(self, name)!r}: this tuner rewrites the model's inputs "
                    "and targets no module; leave it unset"
                )
        v = self.num_virtual_tokens
        if v is None:
            raise ConfigError(f"{type(self).__name__}.num_virtual_tokens is required: a positive int, e.g. 20")
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"num_virtual_tokens must be a positive int, got {v!r}")
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name} must be a positive int or None (read from the model), got {value!r}")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(f"num_transformer_submodules must be 1 or 2, got {self.num_transformer_submodules!r}")


# -- reading the model ----------------------------------------------------------------------------
def model_config(model: nn.Module, tuner: str) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ConfigError(
            f"{tuner} needs a transformers model (with a .config giving its hidden size and layers); "
            f"{type(model).__name__} has none. Virtual tokens only make sense for token-sequence models."
        )
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _first(config: Any, names: tuple[str, ...]) -> int | None:
    values = config.to_dict()
    for name in names:
        value = getattr(config, name, None) if name == "num_hidden_layers" else values.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def fill_from_model(model: nn.Module, config: PromptLearningConfig, tuner: str) -> dict[str, Any]:
    """The config fields peft reads from the model, for those left None (peft's rules, incl. GQA for
    prefixes: a key/value prefix has num_key_value_heads heads)."""
    cfg = model_config(model, tuner)
    found: dict[str, Any] = {}
    if config.num_layers is None:
        found["num_layers"] = _first(cfg, ("num_hidden_layers", "num_layers", "n_layer"))
    if config.token_dim is None:
        found["token_dim"] = _first(cfg, ("hidden_size", "n_embd", "d_model"))
    if config.num_attention_heads is None:
        found["num_attention_heads"] = _first(
            cfg, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
        )
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise ConfigError(
            f"could not read {missing} from {type(model).__name__}.config; set them in the {tuner} config"
        )
    if config.num_transformer_submodules is None:
        found["num_transformer_submodules"] = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1
    return found


def check_position_limit(model: nn.Module, num_virtual_tokens: int, tuner: str) -> None:
    """Virtual tokens take positions: refuse V that leaves no room for a real token."""
    cfg = model_config(model, tuner)
    limit = _first(cfg, ("max_position_embeddings", "n_positions"))
    if limit is not None and num_virtual_tokens >= limit:
        raise ConfigError(
            f"num_virtual_tokens={num_virtual_tokens} does not fit the model's position limit "
            f"(max_position_embeddings={limit}): the virtual tokens alone would use every position. Use fewer."
        )


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def forward_params(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def cache_key(model: nn.Module) -> str | None:
    """The forward argument carrying the KV cache ("cache" in transformers >= 5.x, else "past_key_values")."""
    params = forward_params(model)
    return "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None


# -- the table of virtual tokens ------------------------------------------------------------------
class PromptTable(nn.Module):
    """A learned table of virtual tokens, (rows, width). Also the loaded form of every virtual-token tuner."""

    def __init__(self, rows: int, width: int, *, num_virtual_tokens: int, init: torch.Tensor | None = None):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(rows, width)  # N(0, 1) unless `init` is given
        if init is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(init)

    def table(self) -> torch.Tensor:
        return self.embedding.weight  # (rows, width)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {FILE_KEY: self.embedding.weight.detach()}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.embedding.weight.copy_(tensors[FILE_KEY].to(self.embedding.weight))


class EncodedTable(nn.Module):
    """A table produced by an encoder from a learned input table (P-tuning, projected prefixes).

    The file holds the encoder's output, so this form saves but cannot load: a loaded adapter is a
    PromptTable holding that output."""

    def __init__(self, rows: int, width: int, encoder: nn.Module, *, num_virtual_tokens: int):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(rows, width)
        self.encoder = encoder

    def table(self) -> torch.Tensor:
        return self.encoder(self.embedding.weight.unsqueeze(0))[0]  # (1, rows, w) -> (rows, out)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {FILE_KEY: self.table().detach()}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise ConfigError(
            "the file holds this adapter's encoded virtual tokens, which cannot be turned back into the encoder "
            "that made them; load it with TunedModel.from_pretrained / load_adapter (a plain table)"
        )


def table_rows(module: Any, batch: int) -> torch.Tensor:
    """(batch, rows, width): the table for every row, or each row's own under `adapter_names`
    (a deltatune.core.rows.RowTable)."""
    per_row = getattr(module, "rows_table", None)
    if per_row is not None:
        return per_row(batch)
    return module.table().unsqueeze(0).expand(batch, -1, -1)


# -- rewriting calls: prepend virtual token embeddings (prompt tuning, P-tuning) ---------------------
def _ones(mask: torch.Tensor, v: int) -> torch.Tensor:
    return torch.ones(mask.shape[0], v, dtype=mask.dtype, device=mask.device)


def _drop_position_and_token_types(kwargs: dict[str, Any], tuner: str) -> None:
    """peft's rule: position ids cannot describe the inserted tokens, token type ids are dropped."""
    for key in ("position_ids", "token_type_ids"):
        if kwargs.get(key) is not None:
            warnings.warn(f"{tuner}: {key} are not supported with virtual tokens and are ignored", stacklevel=4)
        kwargs.pop(key, None)


def word_embeddings(model: nn.Module, tuner: str) -> nn.Embedding:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    emb = getattr(emb, "base_layer", emb)  # another adapter may wrap the embedding
    if not isinstance(emb, nn.Embedding):
        raise ConfigError(
            f"{tuner} prepends virtual token embeddings, so the model needs token input embeddings "
            f"(get_input_embeddings() returning an nn.Embedding); {type(model).__name__} has "
            f"{type(emb).__name__ if emb is not None else 'none'}"
        )
    return emb


def prepend_prompts(model: nn.Module, kwargs: dict[str, Any], module: nn.Module, stage: str) -> dict[str, Any]:
    """Prompt tuning / P-tuning: put the first V rows of the table in front of the token embeddings.

    Decoder-only generate works step by step (the first step with an empty cache gets the prompts,
    every step the longer mask); encoder-decoder generate rewrites the encoder input once."""
    kwargs = dict(kwargs)
    v = module.num_virtual_tokens
    enc_dec = is_encoder_decoder(model)
    if stage == "step":
        if enc_dec:
            return kwargs
        cache = kwargs.get(cache_key(model) or "cache")
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ConfigError("virtual tokens need a 2D attention mask in generate (no static/compiled cache)")
            kwargs["attention_mask"] = torch.cat((_ones(mask, v), mask), dim=1)
        kwargs.pop("position_ids", None)  # positions follow the cache, which holds the virtual tokens
        if cache is not None and cache.get_seq_length() > 0:
            return kwargs
        return _with_prompts(model, kwargs, module, v)
    if stage == "generate" and not enc_dec:
        _drop_position_and_token_types(kwargs, "virtual tokens")
        return kwargs
    if stage == "generate":
        kwargs.pop("encoder_outputs", None)
    _drop_position_and_token_types(kwargs, "virtual tokens")
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat((_ones(mask, v), mask), dim=1)
    labels = kwargs.get("labels")
    if labels is not None and not enc_dec and labels.dim() == 2:  # token labels: logits cover the prompts
        ignored = torch.full((labels.shape[0], v), -100, dtype=labels.dtype, device=labels.device)
        kwargs["labels"] = torch.cat((ignored, labels), dim=1)
    return _with_prompts(model, kwargs, module, v)


def _with_prompts(model: nn.Module, kwargs: dict[str, Any], module: nn.Module, v: int) -> dict[str, Any]:
    input_ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    if embeds is None:
        if input_ids is None:
            raise ConfigError("virtual tokens need input_ids or inputs_embeds")
        embeds = model.get_input_embeddings()(input_ids)  # (B, T, d)
    prompts = table_rows(module, embeds.shape[0])[:, :v].to(embeds.dtype)  # (B, V, d)
    kwargs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
    return kwargs

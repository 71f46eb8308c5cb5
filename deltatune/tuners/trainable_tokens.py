"""Trainable tokens: train only chosen rows of an embedding (e.g. new special tokens), peft's TRAINABLE_TOKENS.

peft's `TrainableTokensConfig` (https://huggingface.co/docs/peft/package_reference/trainable_tokens):
the rows `token_indices` of the target embedding are replaced by trained copies, every other row
stays frozen, so a few new tokens learn without training (or saving) the whole table:
    E'[i] = D[k]  for i = token_indices[k],  E'[i] = E[i] otherwise.
D starts as a copy of those rows (identity). Merging writes D into the table and keeps the original
rows, so unmerge restores them exactly. An embedding's scale (Gemma's sqrt(dim)) applies to the
replaced rows too, as in peft.

File layout is peft's: "<embedding>.trainable_tokens_delta", shaped (len(token_indices), dim).
LoraConfig(trainable_token_indices=[ids] or {embedding name: [ids]}) adds such rows to a LoRA adapter
(peft's key "<embedding>.token_adapter.trainable_tokens_delta"). Tied embeddings are handled as peft
does: the output head's logits for the trained tokens use the same trained rows; the standalone
tuner's file holds them under both modules' keys, LoRA's under the embedding's only (as peft's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.core.wrapper import BaseCall


@dataclass(kw_only=True)
class TrainableTokensConfig(TunerConfig):
    """Configuration of a trainable-tokens adapter (field names and meanings are peft's)."""

    tuner_name = "trainable_tokens"
    peft_type = "TRAINABLE_TOKENS"
    sidecar_fields = frozenset({"exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save"})
    run_defaults = {"token_indices": [0, 1, 2]}  # `--tuner trainable_tokens` alone: the first ids (special tokens)

    token_indices: list[int] = field(default_factory=list)
    """Rows of the embedding that train (token ids)."""
    init_weights: bool = True
    """True: start from the rows' current values (identity). False: N(0, 1) (tests only)."""

    def validate(self) -> None:
        if self.target_modules is None:
            self.target_modules = ["embed_tokens"]  # peft: the input embedding
        super().validate()
        check_indices(self.token_indices, "token_indices")


def check_indices(indices: object, field_name: str) -> None:
    """Raise ConfigError unless `indices` is a non-empty list of distinct token ids."""
    if not isinstance(indices, list) or not indices or not all(isinstance(i, int) and i >= 0 for i in indices):
        raise ConfigError(f"{field_name} must be a non-empty list of token ids (integers >= 0), got {indices!r}")
    if len(set(indices)) != len(indices):
        raise ConfigError(f"{field_name} lists a token twice: {indices!r}; give each id once")


class TokenRows(nn.Module):
    """Trained copies of some rows of an embedding table (num_embeddings, dim)."""

    def __init__(self, num_embeddings: int, dim: int, indices: list[int], *, init: bool):
        super().__init__()
        if max(indices) >= num_embeddings:
            raise ConfigError(
                f"token_indices has id {max(indices)}, but the embedding has {num_embeddings} rows; "
                "resize the embeddings first (model.resize_token_embeddings) or fix the ids"
            )
        self.register_buffer("indices", torch.tensor(indices, dtype=torch.long), persistent=False)
        self.trainable_tokens_delta = nn.Parameter(torch.randn(len(indices), dim))
        self._copy_rows = init

    def init_from_base(self, read_weight, write_weight) -> None:
        if self._copy_rows:
            with torch.no_grad():
                self.trainable_tokens_delta.copy_(
                    read_weight().float()[self.indices.to("cpu")].to(self.trainable_tokens_delta)
                )

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        result = base(x)  # (..., dim)
        lookup = torch.full((int(self.indices.max()) + 1,), -1, dtype=torch.long, device=x.device)
        lookup[self.indices.to(x.device)] = torch.arange(len(self.indices), device=x.device)
        slot = lookup[x.clamp(max=len(lookup) - 1)].masked_fill(x >= len(lookup), -1)  # (...), -1: not trained
        rows = F.embedding(slot.clamp(min=0), self.trainable_tokens_delta.to(result.dtype))  # (..., dim)
        scale = base.output_scale
        if scale is not None:
            rows = rows * (scale.to(rows.dtype) if torch.is_tensor(scale) else scale)
        return torch.where((slot >= 0).unsqueeze(-1), rows, result)

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None):
        index = self.indices.to(weight.device)
        originals = weight[index].clone()
        return weight.index_copy(0, index, self.trainable_tokens_delta.to(weight)), bias, originals

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None, originals: torch.Tensor):
        return weight.index_copy(0, self.indices.to(weight.device), originals.to(weight)), bias


def build(config: TrainableTokensConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place TrainableTokensConfig is read."""
    if info.kind != "embedding":
        raise ConfigError(f"trainable tokens adapt an embedding; {module_name!r} is a {info.kind} layer")
    return TokenRows(info.in_features, info.out_features, list(config.token_indices), init=config.init_weights)


def _tied_users(model: nn.Module, target: str, table: torch.Tensor) -> list[str]:
    """Modules other than `target` whose own weight is `table` (an output head tied to the embedding)."""
    from deltatune.core.wrapper import DeltaWrapper

    found = []
    for name, module in model.named_modules():
        if name == target or name.startswith(f"{target}.") or ".deltas." in name:
            continue
        layer = module.base_layer if isinstance(module, DeltaWrapper) else module
        if getattr(layer, "weight", None) is table and not name.endswith(".base_layer"):
            found.append(name)
    return found


class TiedHead(nn.Module):
    """The output head tied to a trained embedding: its logits for the trained tokens use the trained
    rows (the same Parameter as the embedding's), as peft's tied layer does."""

    def __init__(self, rows: TokenRows):
        super().__init__()
        self.indices = rows.indices
        self.trainable_tokens_delta = rows.trainable_tokens_delta  # shared, as peft's tied layer

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        result = base(x)  # (..., vocab)
        rows = F.linear(x.to(result.dtype), self.trainable_tokens_delta.to(result.dtype))  # (..., n)
        if base.bias is not None:
            rows = rows + base.bias.to(rows.dtype)[self.indices.to(rows.device)]
        return result.index_copy(-1, self.indices.to(result.device), rows)

    # merging unties the head from the embedding (TunedModel gives the merged layer its own copy), so
    # each writes the rows into its own table and keeps its originals
    merge = TokenRows.merge
    unmerge = TokenRows.unmerge


def connect(model: nn.Module, config: TrainableTokensConfig, adapter_name: str, targets: list[str]):
    """An output head tied to a target embedding gets the trained rows too (peft wraps it the same
    way); it joins the adapter's targets, so its file key is written and read as peft's."""

    for target in list(targets):
        wrapper = model.get_submodule(target)
        for name in _tied_users(model, target, wrapper.base_layer.weight):
            _add_tied_head(model, name, target, adapter_name, lambda w=wrapper: TiedHead(w.deltas[adapter_name]))
            targets.append(name)
    return None


def _add_tied_head(model: nn.Module, name: str, target: str, adapter_name: str, make) -> None:
    from deltatune import backends
    from deltatune.core import inject
    from deltatune.core.wrapper import DeltaWrapper

    module = model.get_submodule(name)
    head = module if isinstance(module, DeltaWrapper) else None
    if head is not None and adapter_name in head.deltas:
        raise ConfigError(f"{name!r} is tied to {target!r} and is an adapter target itself; drop one of them")
    base = head.base_layer if head else module
    info = backends.describe(base)
    if info is None or info.kind != "linear":
        raise ConfigError(f"{name!r} shares {target!r}'s weight but is not a linear head; untie them")
    if head is None:
        head = DeltaWrapper(base, info)
        head.train(base.training)
        inject._set_module(model, name, head)
    head.deltas[adapter_name] = make().train(base.training)


def file_keys(tensors: dict[str, torch.Tensor], targets: list[str]) -> dict[str, torch.Tensor]:
    """A tied head's key, which the state dict holds once (one Parameter), written as peft does: a copy
    of the embedding's rows under "<head>.trainable_tokens_delta"."""
    out = dict(tensors)
    present = [t for t in targets if f"{t}.trainable_tokens_delta" in out]
    for target in targets:
        key = f"{target}.trainable_tokens_delta"
        if key not in out and present:
            out[key] = out[f"{present[0]}.trainable_tokens_delta"].clone()
    return out


class TokenAdapter(nn.Module):
    """LoRA's `trainable_token_indices` rows on an embedding, filed under peft's key
    "<embedding>.token_adapter.trainable_tokens_delta"."""

    def __init__(self, rows: TokenRows):
        super().__init__()
        self.token_adapter = rows

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        return self.token_adapter(x, base)

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None):
        return self.token_adapter.merge(weight, bias)

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None, originals: torch.Tensor):
        return self.token_adapter.unmerge(weight, bias, originals)


def _embedding_names(model: nn.Module, indices: list[int] | dict[str, list[int]]) -> dict[str, list[int]]:
    from deltatune.core.wrapper import DeltaWrapper

    if isinstance(indices, dict):
        found = {}
        for key, ids in indices.items():
            names = [n for n, _ in model.named_modules() if (n == key or n.endswith(f".{key}")) and ".deltas." not in n]
            names = [n for n in names if not n.endswith(".base_layer")]
            if len(names) != 1:
                raise ConfigError(
                    f"trainable_token_indices names {key!r}, which matches {len(names)} modules; name one embedding"
                )
            found[names[0]] = ids
        return found
    get_in = getattr(model, "get_input_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    for name, module in model.named_modules():
        if embedding is not None and (
            module is embedding or (isinstance(module, DeltaWrapper) and module.base_layer is embedding)
        ):
            return {name: indices}
    raise ConfigError(
        "trainable_token_indices as a list needs a model with get_input_embeddings(); give {embedding module name: ids}"
    )


def add_token_rows(
    model: nn.Module, indices: list[int] | dict[str, list[int]], adapter_name: str, targets: list[str]
) -> None:
    """Add an adapter's trainable rows (LoraConfig.trainable_token_indices) to the named embeddings."""
    from deltatune import backends
    from deltatune.core import inject
    from deltatune.core.wrapper import DeltaWrapper

    for name, ids in _embedding_names(model, indices).items():
        module = model.get_submodule(name)
        wrapper = module if isinstance(module, DeltaWrapper) else None
        if wrapper is not None and adapter_name in wrapper.deltas:
            raise ConfigError(
                f"{name!r} is both a LoRA target and in trainable_token_indices; drop it from target_modules"
            )
        base = wrapper.base_layer if wrapper else module
        info = backends.describe(base)
        if info is None or info.kind != "embedding":
            raise ConfigError(f"trainable_token_indices names {name!r}, which is not an embedding")
        rows = TokenRows(info.in_features, info.out_features, ids, init=True).to(base.weight.device)
        rows.init_from_base(lambda b=base: backends.read_weight(b), None)
        if wrapper is None:
            wrapper = DeltaWrapper(base, info)
            wrapper.train(base.training)
            inject._set_module(model, name, wrapper)
        wrapper.deltas[adapter_name] = TokenAdapter(rows).train(base.training)
        for head_name in _tied_users(model, name, base.weight):  # a tied output head: the same rows (peft's file: once)
            _add_tied_head(model, head_name, name, adapter_name, lambda r=rows: TokenAdapter(TiedHead(r)))


SPEC = TunerSpec(
    name="trainable_tokens",
    kind="delta",
    config=TrainableTokensConfig,
    peft_type="TRAINABLE_TOKENS",
    dispatch=("embedding",),
    build=build,
    connect=connect,
    file_keys=file_keys,
    paper="https://huggingface.co/docs/peft/package_reference/trainable_tokens",
    example_configs=({"token_indices": list(range(30))},),  # most ids the tiny models' inputs use
)

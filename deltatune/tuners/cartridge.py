"""CARTRIDGE: a trained KV cache put in front of every attention layer (prefix tuning without the MLP).

Eyuboglu et al. 2025, "Cartridges: Lightweight and general-purpose long context representations via
self-study", https://arxiv.org/abs/2506.06266. The keys and values of V virtual tokens for every layer
are themselves the trained parameters, one table P in R^{V x (L * 2 * token_dim)} served exactly as
prefix tuning serves its prefixes (through the KV cache; see deltatune.tuners.prefix_tuning):

    K_l = [Pk_l ; W_k h],   V_l = [Pv_l ; W_v h]

The first `num_frozen_tokens` rows stay fixed (the paper keeps the first token, an attention sink,
frozen); the rest train. Rows start N(0, 1), so a fresh adapter changes the output (the paper
initialises from the KV cache of a real text, a separate step here as in peft). Nothing to merge.

File layout is peft's: one table "prompt_embeddings" of shape (V, L * 2 * token_dim).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.core.config import ConfigError
from deltatune.core.registry import TunerSpec
from deltatune.tuners import prefix_tuning
from deltatune.tuners import prompt_learning as pl


@dataclass(kw_only=True)
class CartridgeConfig(pl.PromptLearningConfig):
    """Configuration of a CARTRIDGE adapter (field names and meanings are peft's)."""

    tuner_name = "cartridge"
    peft_type = "CARTRIDGE"

    num_frozen_tokens: int = 1
    """Leading virtual tokens kept fixed (0 to num_virtual_tokens)."""

    def validate(self) -> None:
        super().validate()
        n = self.num_frozen_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.num_virtual_tokens:
            raise ConfigError(
                f"num_frozen_tokens must be in [0, num_virtual_tokens={self.num_virtual_tokens}], got {n!r}"
            )


class CartridgeTable(nn.Module):
    """(V, width) table: frozen leading rows (a buffer, never trained) then trained rows."""

    def __init__(self, rows: int, width: int, frozen: int):
        super().__init__()
        self.num_virtual_tokens = rows
        self.register_buffer("frozen", torch.randn(frozen, width))
        self.trainable = nn.Parameter(torch.randn(rows - frozen, width))

    def table(self) -> torch.Tensor:
        return torch.cat([self.frozen.to(self.trainable), self.trainable], dim=0)  # (V, width)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {pl.FILE_KEY: self.table().detach()}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        table = tensors[pl.FILE_KEY]
        with torch.no_grad():
            self.frozen.copy_(table[: self.frozen.shape[0]].to(self.frozen))
            self.trainable.copy_(table[self.frozen.shape[0] :].to(self.trainable))


def build_input(model: nn.Module, config: CartridgeConfig, for_loading: bool) -> nn.Module:
    """The one place CartridgeConfig is read."""
    width = config.num_layers * 2 * config.token_dim
    module = CartridgeTable(config.num_virtual_tokens, width, config.num_frozen_tokens)
    module.prefix_layout = (
        config.num_layers,
        config.num_attention_heads,
        config.token_dim,
        config.num_transformer_submodules,
    )
    weight = next(model.parameters(), None)
    return module.to(weight.device) if weight is not None else module


def prepare(model: nn.Module, config: CartridgeConfig, targets: list[str]) -> CartridgeConfig:
    """The model's sizes and checks, exactly as prefix tuning reads them (same cache layout)."""
    sizes = prefix_tuning.prepare(
        model,
        prefix_tuning.PrefixTuningConfig(num_virtual_tokens=config.num_virtual_tokens, task_type=config.task_type),
        targets,
    )
    names = ("token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules")
    return config.replace(**{name: getattr(config, name) or getattr(sizes, name) for name in names})


SPEC = TunerSpec(
    name="cartridge",
    kind="input",
    config=CartridgeConfig,
    peft_type="CARTRIDGE",
    build_input=build_input,
    prepare=prepare,
    prepare_inputs=prefix_tuning.prepare_inputs,
    mergeable=False,
    identity_at_init=False,
    paper="https://arxiv.org/abs/2506.06266",
    contract_models=("llama", "t5"),  # a decoder-only and an encoder-decoder cache layout
    example_configs=({"num_virtual_tokens": 3},),
)

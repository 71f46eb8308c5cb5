"""P-tuning: prompt tuning whose virtual tokens come out of a small trained encoder.

Liu et al. 2021, "GPT Understands, Too", https://arxiv.org/abs/2103.10385. With a learned input
table H in R^{V x d} and an encoder f (an MLP, or a bidirectional LSTM followed by an MLP):

    P = f(H) in R^{V x d},   inputs_embeds = [P ; E(x)]

The reparameterization couples the virtual tokens, which trains more stably than a free table.
Everything about the inputs (mask, labels, generate) is as in prompt tuning. Not identity at init
(`identity_at_init=False`: the virtual tokens are real inputs), nothing to merge (`mergeable=False`).

Saved as peft does: "prompt_embeddings" holds P itself, the encoder's output, shape
(V * num_transformer_submodules, token_dim). A loaded adapter is therefore a plain table P; training it
further (is_trainable=True) trains that table directly, as prompt tuning would.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.core.config import ConfigError
from deltatune.core.registry import TunerSpec
from deltatune.tuners import prompt_learning as pl

ENCODERS = ("MLP", "LSTM")


@dataclass(kw_only=True)
class PTuningConfig(pl.PromptLearningConfig):
    """Configuration of P-tuning (peft's PromptEncoderConfig; same fields and meanings)."""

    tuner_name = "p_tuning"
    peft_type = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    """The encoder f: "MLP" (3 linear layers with ReLU) or "LSTM" (bidirectional LSTM, then a 2-layer MLP)."""
    encoder_hidden_size: int | None = None
    """Hidden width of the encoder; the model's token_dim when None."""
    encoder_num_layers: int = 2
    """LSTM layers (the MLP always has peft's fixed 3 linear layers)."""
    encoder_dropout: float = 0.0
    """Dropout between LSTM layers."""

    def validate(self) -> None:
        super().validate()
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        if kind not in ENCODERS:
            raise ConfigError(
                f"encoder_reparameterization_type={self.encoder_reparameterization_type!r} is unknown; use one of "
                f"{list(ENCODERS)}"
            )
        self.encoder_reparameterization_type = kind
        hidden = self.encoder_hidden_size
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0):
            raise ConfigError(f"encoder_hidden_size must be a positive int or None (token_dim), got {hidden!r}")
        if (
            isinstance(self.encoder_num_layers, bool)
            or not isinstance(self.encoder_num_layers, int)
            or self.encoder_num_layers < 1
        ):
            raise ConfigError(f"encoder_num_layers must be an int >= 1, got {self.encoder_num_layers!r}")
        if not 0.0 <= float(self.encoder_dropout) < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")


class MlpEncoder(nn.Module):
    """f(H) = W3 relu(W2 relu(W1 H)): (1, V, d) -> (1, V, d)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp_head = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(h)


class LstmEncoder(nn.Module):
    """f(H) = MLP(BiLSTM(H)): (1, V, d) -> (1, V, 2 * hidden) -> (1, V, d)."""

    def __init__(self, dim: int, hidden: int, num_layers: int, dropout: float):
        super().__init__()
        self.lstm_head = nn.LSTM(
            dim, hidden, num_layers=num_layers, dropout=dropout, bidirectional=True, batch_first=True
        )
        self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.lstm_head(h)[0])


def build_input(model: nn.Module, config: PTuningConfig, for_loading: bool) -> nn.Module:
    """The only place PTuningConfig is read."""
    device = pl.word_embeddings(model, "P-tuning").weight.device
    rows, dim, v = (
        config.num_virtual_tokens * config.num_transformer_submodules,
        config.token_dim,
        config.num_virtual_tokens,
    )
    if for_loading:
        return pl.PromptTable(rows, dim, num_virtual_tokens=v).to(device)
    hidden = config.encoder_hidden_size
    if config.encoder_reparameterization_type == "LSTM":
        encoder = LstmEncoder(dim, hidden, config.encoder_num_layers, float(config.encoder_dropout))
    else:
        if config.encoder_num_layers != 2:
            warnings.warn(
                "P-tuning: encoder_num_layers is ignored for the MLP encoder (always 3 linear layers)", stacklevel=2
            )
        encoder = MlpEncoder(dim, hidden)
    return pl.EncodedTable(rows, dim, encoder, num_virtual_tokens=v).to(device)


def prepare(model: nn.Module, config: PTuningConfig, _targets: list[str]) -> PTuningConfig:
    """Fill token_dim / num_layers / ... (and encoder_hidden_size) from the model and check the pairing."""
    pl.word_embeddings(model, "P-tuning")
    config = config.replace(**pl.fill_from_model(model, config, "P-tuning"))
    if config.encoder_hidden_size is None:
        config = config.replace(encoder_hidden_size=config.token_dim)
    pl.check_position_limit(model, config.num_virtual_tokens, "P-tuning")
    return config


SPEC = TunerSpec(
    name="p_tuning",
    kind="input",
    config=PTuningConfig,
    peft_type="P_TUNING",
    build_input=build_input,
    prepare=prepare,
    prepare_inputs=pl.prepend_prompts,
    mergeable=False,
    identity_at_init=False,
    paper="https://arxiv.org/abs/2103.10385",
    example_configs=({"num_virtual_tokens": 3, "encoder_hidden_size": 8},),
)

"""Prompt tuning: learn V "soft prompt" vectors and put them in front of the input.

Lester et al. 2021, https://arxiv.org/abs/2104.08691. With token embeddings E(x) in R^{T x d}:

    inputs_embeds = [P ; E(x)],   P in R^{V x d}   (the only trained tensor; V * d values)

The attention mask grows by V ones, and for decoder-only models the logits cover the virtual tokens
too, so the labels grow by V times -100 (as in peft). Encoder-decoder models get the prompts in front
of the encoder input. Init: RANDOM (N(0, 1)), SAMPLE_VOCAB (embeddings of random vocabulary tokens) or
TEXT (embeddings of `prompt_tuning_init_text`, repeated or cut to V tokens).

Not identity at init (`identity_at_init=False`): the virtual tokens are real inputs the model attends
to, so outputs on the real tokens differ from the base model's from the start, by design. Nothing is
merged into weights (`mergeable=False`). Saved as peft does: one tensor "prompt_embeddings" of shape
(V * num_transformer_submodules, token_dim); encoder-decoder models keep a second block of V rows,
unused by the forward, for file compatibility.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.core.config import ConfigError
from deltatune.core.registry import TunerSpec
from deltatune.tuners import prompt_learning as pl

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass(kw_only=True)
class PromptTuningConfig(pl.PromptLearningConfig):
    """Configuration of prompt tuning (field names and meanings are peft's)."""

    tuner_name = "prompt_tuning"
    peft_type = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    """How the virtual tokens start: "RANDOM", "SAMPLE_VOCAB" or "TEXT"."""
    prompt_tuning_init_text: str | None = None
    """TEXT init: the text whose token embeddings start the prompt."""
    tokenizer_name_or_path: Any = None
    """TEXT init: a tokenizer object, or the local path/name of one (never downloaded). Saved as its name."""
    tokenizer_kwargs: dict | None = None
    """TEXT init: extra arguments for AutoTokenizer.from_pretrained (trust_remote_code is never passed)."""

    def validate(self) -> None:
        super().validate()
        init = self.prompt_tuning_init
        init = getattr(init, "value", init)  # accept peft's PromptTuningInit enum
        if init not in INITS:
            raise ConfigError(f"prompt_tuning_init={self.prompt_tuning_init!r} is unknown; use one of {list(INITS)}")
        self.prompt_tuning_init = init
        if init == "TEXT":
            if not self.prompt_tuning_init_text:
                raise ConfigError('prompt_tuning_init="TEXT" needs prompt_tuning_init_text (the text to start from)')
            if not self.tokenizer_name_or_path:
                raise ConfigError(
                    'prompt_tuning_init="TEXT" needs tokenizer_name_or_path: a tokenizer object or a local tokenizer path'
                )
        elif self.tokenizer_kwargs:
            raise ConfigError('tokenizer_kwargs only apply with prompt_tuning_init="TEXT"')

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        tok = self.tokenizer_name_or_path
        if tok is not None and not isinstance(tok, str):  # a tokenizer object is saved as its name
            out["tokenizer_name_or_path"] = getattr(tok, "name_or_path", None) or type(tok).__name__
        return out


def _text_ids(config: PromptTuningConfig, rows: int) -> list[int]:
    tok = config.tokenizer_name_or_path
    if isinstance(tok, str):
        from transformers import AutoTokenizer

        kwargs = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
        try:
            # explicit False: transformers would otherwise ask on the terminal for a remote-code tokenizer
            tok = AutoTokenizer.from_pretrained(tok, local_files_only=True, trust_remote_code=False, **kwargs)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"tokenizer_name_or_path={tok!r}: no tokenizer there locally ({exc}); deltatune never downloads "
                "one here. Pass a tokenizer object instead, or a local directory."
            ) from None
    ids = list(tok(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} tokenizes to no token")
    return (ids * math.ceil(rows / len(ids)))[:rows]


def build_input(model: nn.Module, config: PromptTuningConfig, for_loading: bool) -> pl.PromptTable:
    """The only place PromptTuningConfig is read."""
    emb = pl.word_embeddings(model, "prompt tuning")
    rows = config.num_virtual_tokens * config.num_transformer_submodules
    init = None
    if not for_loading and config.prompt_tuning_init != "RANDOM":
        if config.prompt_tuning_init == "TEXT":
            ids = torch.tensor(_text_ids(config, rows), device=emb.weight.device)
        else:
            ids = torch.randint(0, emb.num_embeddings, (rows,), device=emb.weight.device)
        if int(ids.max()) >= emb.num_embeddings:
            raise ConfigError(f"the tokenizer gives token id {int(ids.max())}, outside the model's vocabulary")
        init = emb(ids).detach().float()  # (rows, d), kept in fp32
    table = pl.PromptTable(rows, config.token_dim, num_virtual_tokens=config.num_virtual_tokens, init=init)
    return table.to(emb.weight.device)


def prepare(model: nn.Module, config: PromptTuningConfig, _targets: list[str]) -> PromptTuningConfig:
    """Fill token_dim / num_layers / ... from the model and check the pairing."""
    pl.word_embeddings(model, "prompt tuning")
    config = config.replace(**pl.fill_from_model(model, config, "prompt tuning"))
    pl.check_position_limit(model, config.num_virtual_tokens, "prompt tuning")
    return config


SPEC = TunerSpec(
    name="prompt_tuning",
    kind="input",
    config=PromptTuningConfig,
    peft_type="PROMPT_TUNING",
    build_input=build_input,
    prepare=prepare,
    prepare_inputs=pl.prepend_prompts,
    mergeable=False,
    identity_at_init=False,
    paper="https://arxiv.org/abs/2104.08691",
    example_configs=({"num_virtual_tokens": 3},),
)

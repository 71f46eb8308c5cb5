"""Helpers for the data tests: a tiny offline tokenizer with a ChatML template, file writers.

A uniquely named module (not conftest) so `from data_helpers import ...` cannot pick up
another test folder's conftest.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "hello how are you doing today",
    "I am fine thank you and you",
    "the capital of France is Paris",
    "user assistant system",
    "what is a computer program",
    "你好 最近如何",
]


def build_tiny_tokenizer(*, chat_template: str | None = CHATML_TEMPLATE, pad_is_eos: bool = False):
    """Byte-level BPE trained on a few sentences, wrapped as a transformers fast tokenizer.

    Byte-level means any text (including Chinese) encodes without unknown tokens.
    <|im_end|> is both the end-of-turn marker and the EOS token, as in SmolLM2-Instruct.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>" if pad_is_eos else "<pad>",
        chat_template=chat_template,
    )


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path

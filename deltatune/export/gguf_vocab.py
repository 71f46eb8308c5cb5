"""The tokenizer as GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`), the way llama.cpp's
converter writes it.

Two kinds, told apart by the fast tokenizer's `tokenizer.json`:

* byte-level BPE (GPT-2 style: SmolLM2, Qwen2/3, Llama 3) -> `tokenizer.ggml.model = "gpt2"`, the
  vocabulary in byte-alphabet spelling, the merges, and `tokenizer.ggml.pre`, the name llama.cpp
  gives the text-splitting regex (read from the pre-tokenizer here, where llama.cpp's converter
  hashes a test encoding; an unknown splitter is written as "default" with a warning);
* SentencePiece-style BPE with byte fallback (Llama 2, Mistral) -> `"llama"`, with `<0xNN>` byte
  tokens, scores that rank merged tokens by merge order, and the merges.

Token types follow llama.cpp: 1 normal, 3 control (special added tokens), 4 user-defined (other
added tokens), 5 unused (ids the model has but the tokenizer does not: `[PAD<i>]`), 6 byte.
Special token ids, add_bos/add_eos and the chat template come from the `gguf` package's
SpecialVocab over the tokenizer's saved files, as in llama.cpp.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from deltatune.export.gguf_arch import ExportError

logger = logging.getLogger(__name__)

_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLITS = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


def _pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE, from its pre-tokenizer."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # SmolLM/SmolLM2 (StarCoder-style digit splitting)
    if kinds and kinds[0] == "Split":
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in _SPLITS:
            return _SPLITS[regex]
    logger.warning("unrecognised pre-tokenizer %s: written as 'default'; llama.cpp may split text differently", kinds)
    return "default"


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, model_config: Any) -> str:
    """Write `tokenizer`'s metadata into a GGUFWriter; returns "gpt2" or "llama" (the kind written).

    Raises:
        ExportError: a slow (Python) tokenizer, or a tokenizer model other than BPE.
    """
    import gguf

    if not getattr(tokenizer, "is_fast", False):
        raise ExportError("GGUF export needs a fast tokenizer (tokenizer.json); this model has a slow one")
    with tempfile.TemporaryDirectory(prefix="deltatune-gguf-vocab-") as tmp:
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "config.json").write_text(model_config.to_json_string(), encoding="utf-8")
        tokenizer_json = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')!r}")
    spm_style = bool(model.get("byte_fallback"))
    tokens, types = _tokens(tokenizer, vocab_size, spm_style)
    writer.add_tokenizer_model("llama" if spm_style else "gpt2")
    writer.add_tokenizer_pre("default" if spm_style else _pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if spm_style:
        writer.add_token_scores(_merge_scores(tokens, special.merges))
        writer.add_add_space_prefix(_adds_space_prefix(tokenizer_json))
    else:
        writer.add_add_space_prefix(False)
    special.add_special_token.update(_adds_special(tokenizer))  # what it does, not what its files claim
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)  # e.g. a registry fallback template set in memory
    return "llama" if spm_style else "gpt2"


def _tokens(tokenizer: Any, vocab_size: int, spm_style: bool) -> tuple[list[str], list[int]]:
    """Token texts by id (padded to the model's vocabulary with `[PAD<i>]`) and llama.cpp token types."""
    import gguf

    kinds = gguf.TokenType
    reverse = {index: text for text, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens: list[str] = []
    types: list[int] = []
    for index in range(vocab_size):
        text = reverse.get(index)
        if text is None:
            tokens.append(f"[PAD{index}]")
            types.append(kinds.UNUSED)
            continue
        if spm_style and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):  # byte-fallback pieces, added or not
            types.append(kinds.BYTE)
        elif index in added:
            token = added[index]
            types.append(kinds.CONTROL if token.special else kinds.USER_DEFINED)
        else:
            types.append(kinds.NORMAL)
        tokens.append(text)
    if len(reverse) > vocab_size:
        raise ExportError(
            f"the tokenizer has {len(reverse)} tokens but the model's embedding only {vocab_size}; "
            "resize the model's embeddings before exporting"
        )
    return tokens, types


def _adds_special(tokenizer: Any) -> dict[str, bool]:
    """Whether encoding plain text adds BOS / EOS (llama.cpp's add_bos_token / add_eos_token)."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    return {"bos": bos is not None and ids[:1] == [bos], "eos": eos is not None and len(ids) > 1 and ids[-1:] == [eos]}


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece-style scores: a token made by merge k scores -k (earlier merges win); others 0."""
    rank: dict[str, int] = {}
    for k, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        rank.setdefault(left + right, k)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _adds_space_prefix(tokenizer_json: dict[str, Any]) -> bool:
    text = json.dumps([tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text or '"prepend_scheme": "first"' in text

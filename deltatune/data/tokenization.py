"""Tokenize canonical rows for training, with label masking and truncation that keeps EOS.

Chat rows: the conversation is rendered with the model's chat template one assistant turn at a
time. For turn k, the text before its content (system/user turns, role headers, generation
prompt) is masked (label -100); the assistant content AND the template's closing text after it
(end-of-turn marker such as `<|im_end|>`, or EOS) are supervised. Supervising the closing token
is what teaches the model to stop; leaving it masked gives a model that never ends its answer.

Truncation to max_length keeps whole earlier turns, drops later ones, and cuts the *content* of
the last kept assistant turn from the end, never its closing tokens. A row whose first
assistant turn cannot keep at least one content token plus its closing is fully masked: it is
dropped and counted ("labels_fully_masked"), not trained on.

Templates whose closing text holds no special token (or that have none) get one EOS appended
after the final kept answer; mid-conversation turns stay exactly as the template renders them.

Masks are built from positions, never by comparing token ids, so pad == eos is harmless: the
collator masks padding through the attention mask, and real EOS tokens stay supervised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from deltatune.data.report import DataError, DataReport, RowError
from deltatune.data.templates import render_chat, split_assistant_reply

IGNORE_INDEX = -100
"""Label value PyTorch's cross-entropy ignores."""


@dataclass
class _Turn:
    """Token ids of one assistant turn and everything before it since the previous turn."""

    prompt: list[int]  # masked: earlier user/system text, role headers, template opening
    content: list[int]  # supervised, truncatable
    closing: list[int]  # supervised, never truncated (end-of-turn / EOS)
    needs_eos: bool = False  # closing has no special token: EOS must end the sequence here


def _ids(tokenizer: Any, text: str) -> list[int]:
    # Special tokens written in the template text (e.g. <|im_start|>) are matched as such;
    # add_special_tokens=False stops the tokenizer adding a second BOS the template already has.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _assistant_turns(tokenizer: Any, messages: Sequence[Mapping[str, str]], chat_template: str | None) -> list[_Turn]:
    turns: list[_Turn] = []
    rendered = ""  # text of the conversation up to the end of the previous assistant turn
    messages = [dict(m) for m in messages]
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = render_chat(tokenizer, messages[:i], add_generation_prompt=True, chat_template=chat_template)
        full_text = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False, chat_template=chat_template)
        if not (prompt_text.startswith(rendered) and full_text.startswith(prompt_text)):
            # The template rewrites earlier turns (e.g. strips reasoning from history), so a
            # per-turn mask cannot be cut from one rendering.
            raise RowError("template_mismatch", f"chat template is not prefix-stable at messages[{i}]")
        reply = full_text[len(prompt_text) :]
        parts = split_assistant_reply(
            tokenizer, messages[: i + 1], reply, message["content"], chat_template=chat_template
        )
        opening, content, closing = parts if parts is not None else ("", reply, "")
        turn = _Turn(
            prompt=_ids(tokenizer, prompt_text[len(rendered) :] + opening),
            content=_ids(tokenizer, content),
            closing=_ids(tokenizer, closing),
        )
        special = set(getattr(tokenizer, "all_special_ids", None) or [])
        if tokenizer.eos_token_id is not None and not special.intersection(turn.closing):
            # The template closes answers with plain text (or nothing): without an EOS after
            # the final answer the model never learns to stop.
            turn.needs_eos = True
        turns.append(turn)
        rendered = full_text
    return turns


def encode_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    *,
    max_length: int,
    chat_template: str | None = None,
) -> dict[str, list[int]] | None:
    """Tokenize one conversation with prompt masking and EOS-preserving truncation.

    Args:
        tokenizer: a transformers tokenizer (its chat_template is used unless `chat_template`).
        messages: canonical messages (validated: system first if any, user before assistant).
        max_length: maximum number of tokens of the result.
        chat_template: a Jinja template overriding the tokenizer's.

    Returns:
        {"input_ids", "labels", "attention_mask"} lists of equal length, or None when no
        supervised token survives truncation (the caller drops and counts the row).

    Raises:
        RowError: "template_mismatch" when the template is not prefix-stable for this row.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    input_ids: list[int] = []
    labels: list[int] = []
    last_needs_eos = False
    for turn in _assistant_turns(tokenizer, messages, chat_template):
        # Room is reserved for an EOS whenever this turn might end the sequence.
        room = max_length - len(input_ids) - len(turn.prompt) - len(turn.closing) - turn.needs_eos
        if room < 1:  # not even one content token fits before the closing tokens
            break
        content = turn.content[:room]
        input_ids += turn.prompt + content + turn.closing
        labels += [IGNORE_INDEX] * len(turn.prompt) + content + turn.closing
        last_needs_eos = turn.needs_eos
        if len(content) < len(turn.content):
            break  # this turn was cut; anything after it would be out of context
    if all(label == IGNORE_INDEX for label in labels):
        return None
    if last_needs_eos:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    assert len(input_ids) == len(labels) <= max_length
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def encode_classification(
    tokenizer: Any,
    row: Mapping[str, Any],
    *,
    max_length: int,
    label2id: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Tokenize {"text", "label"[, "text_pair"]} for sequence classification.

    Int labels are used as class ids; str labels are mapped through `label2id`.

    Raises:
        RowError: "unknown_label" for a str label missing from label2id.
    """
    label = row["label"]
    if isinstance(label, str):
        if not label2id or label not in label2id:
            raise RowError("unknown_label", "label not in label2id")
        label = label2id[label]
    encoded = tokenizer(row["text"], row.get("text_pair"), truncation=True, max_length=max_length)
    return {
        "input_ids": list(encoded["input_ids"]),
        "attention_mask": list(encoded["attention_mask"]),
        "labels": int(label),
    }


def encode_rows(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_length: int,
    chat_template: str | None = None,
    max_bad_fraction: float = 0.5,
) -> tuple[list[dict[str, list[int]]], DataReport]:
    """encode_chat over canonical chat rows; dropped rows are counted per reason.

    Raises:
        DataError: no row left, or more than max_bad_fraction of rows dropped.
    """
    report = DataReport(source="tokenization")
    examples = []
    truncated = 0
    if rows and "messages" not in rows[0]:
        kind = (
            "image-classification"
            if "image" in rows[0]
            else "classification"
            if "label" in rows[0]
            else "NER"
            if "tags" in rows[0]
            else "non-chat"
        )
        raise DataError(
            f"these are {kind} rows (fields {sorted(rows[0])}), but this step trains on chat/instruction data "
            "(rows with 'messages'); use a chat or instruction data set, e.g. chatterbot-en or alpaca-en"
        )
    for i, row in enumerate(rows):
        report.total += 1
        try:
            example = encode_chat(tokenizer, row["messages"], max_length=max_length, chat_template=chat_template)
        except RowError as err:
            report.add(err.reason, f"row {i}", err.detail)
            continue
        if example is None:
            report.add("labels_fully_masked", f"row {i}", f"no answer token fits in max_length={max_length}")
            continue
        truncated += len(example["input_ids"]) == max_length
        examples.append(example)
    report.kept = len(examples)
    if truncated:
        report.notes.append(f"{truncated} rows reach max_length={max_length} (truncated or exactly full)")
    report.check(max_bad_fraction)
    return examples, report

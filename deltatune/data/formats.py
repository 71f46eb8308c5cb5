"""Converters from the on-disk/hub row formats to the four canonical forms we train on.

Canonical forms (everything downstream sees only these):
- chat:            {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
                   (+ "images": [path] for image-caption rows)
- classification:  {"text": str, "label": int|str} (+ "text_pair": str for sentence pairs)
- ner:             {"tokens": [str, ...], "tags": [str, ...]} of equal length
- image:           {"image": uint8 numpy array (H, W) or (H, W, C), C in 1/3/4, "label": int >= 0}

Source formats: alpaca (instruction/input/output, optional system and history), sharegpt
(conversations of {from, value} or {role, content} or {human, assistant} pairs), messages,
classification, ner, image-caption, image-classification. A catalogue entry's `columns` map
renames source columns to these field names first. Every problem raises RowError with a report
reason and a detail that names fields and types only (never row content).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from deltatune.data.report import RowError

ROLES = ("system", "user", "assistant")
# The last three are deltatune rlhf's (deltatune/data/preference.py).
FORMATS = (
    "alpaca",
    "sharegpt",
    "messages",
    "classification",
    "ner",
    "image-caption",
    "image-classification",
    "preference",
    "kto",
    "prompt-only",
)

# ShareGPT-style dumps name roles many ways; anything else is an "unknown_role".
DEFAULT_ROLE_MAP = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "assistant": "assistant",
}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _describe_role(value: Any) -> str:
    # A role value is data; only echo it when it looks like an identifier, never free text.
    if isinstance(value, str) and _IDENTIFIER.fullmatch(value):
        return f"role {value!r}"
    return f"role of type {_type_name(value)}"


def get_field(row: Mapping[str, Any], key: str, kind: type | tuple[type, ...] = str) -> Any:
    """Return row[key] checked against `kind`, or raise RowError naming the field."""
    if key not in row:
        raise RowError("missing_field", f"field {key!r}")
    value = row[key]
    if value is None:
        raise RowError("null_value", f"field {key!r}")
    # bool is an int subclass, but a bool label/content is almost certainly a broken export.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise RowError("wrong_type", f"field {key!r} is {_type_name(value)}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _optional_str(row: Mapping[str, Any], key: str) -> str:
    """Optional text field: absent/None/NaN-free string -> '' ; other types are an error."""
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError("wrong_type", f"field {key!r} is {_type_name(value)}")
    return value


def _parse_literal(value: str, key: str) -> Any:
    """Decode a list stored as a string (JSON, or a Python literal as some hub dumps use).

    ast.literal_eval evaluates literals only (no names, calls or attributes), so it cannot run code.
    """
    try:
        return json.loads(value)
    except ValueError:
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise RowError("wrong_type", f"field {key!r} is a string that is not a list literal") from None


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Validate a canonical message list and return a clean copy (only role/content keys).

    Raises:
        RowError: wrong types, null or missing role/content, empty turns, unknown roles,
            system turn not first, no user turn before the first assistant turn, no assistant turn,
            a last turn that is not the assistant's.
    """
    if not isinstance(messages, list):
        raise RowError("wrong_type", f"field 'messages' is {_type_name(messages)}")
    if not messages:
        raise RowError("empty_turn", "field 'messages' is an empty list")
    clean = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, Mapping):
            raise RowError("wrong_type", f"messages[{i}] is {_type_name(turn)}")
        for key in ("role", "content"):
            if key not in turn:
                raise RowError("missing_field", f"messages[{i}].{key}")
            if turn[key] is None:
                raise RowError("null_value", f"messages[{i}].{key}")
            if not isinstance(turn[key], str):
                raise RowError("wrong_type", f"messages[{i}].{key} is {_type_name(turn[key])}")
        if turn["role"] not in ROLES:
            raise RowError("unknown_role", f"messages[{i}] has {_describe_role(turn['role'])}")
        if not turn["content"].strip():
            raise RowError("empty_turn", f"messages[{i}] ({turn['role']}) is empty")
        if turn["role"] == "system" and i != 0:
            raise RowError("bad_turn_order", f"messages[{i}] is a system turn after the start")
        clean.append({"role": turn["role"], "content": turn["content"]})
    roles = [m["role"] for m in clean if m["role"] != "system"]
    if "assistant" not in roles:
        raise RowError("no_assistant_turn", "nothing to learn from: no assistant turn")
    if roles[0] != "user":
        raise RowError("bad_turn_order", "first non-system turn is not a user turn")
    if roles[-1] != "assistant":  # the trailing user turn would have no answer to learn
        raise RowError("ends_with_user_turn", f"messages[{len(clean) - 1}] (the last turn) is a user turn")
    return clean


def from_messages(row: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """{"messages": [...]} rows, already canonical apart from validation."""
    if "messages" not in row:
        raise RowError("missing_field", "field 'messages'")
    if row["messages"] is None:
        raise RowError("null_value", "field 'messages'")
    return {"messages": check_messages(row["messages"])}


def from_alpaca(row: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """instruction (+ input) -> user, output -> assistant; optional system and history pairs.

    ms-swift's query/response names are accepted as aliases of instruction/output.
    Options: `input_prefix` (stripped from input, e.g. "输入："), `instruction_template`
    (text with a literal "{instruction}" placeholder; str.replace, so braces in data are safe).
    """
    row = dict(row)
    for alias, name in (("query", "instruction"), ("response", "output")):
        if name not in row and alias in row:
            row[name] = row[alias]
    for key, value in (options.get("defaults") or {}).items():
        if row.get(key) is None:
            row[key] = value
    instruction = get_field(row, "instruction")
    output = get_field(row, "output")
    extra = _optional_str(row, "input")
    prefix = options.get("input_prefix")
    if prefix and extra.startswith(prefix):
        extra = extra[len(prefix) :]
    template = options.get("instruction_template")
    if template:
        instruction = template.replace("{instruction}", instruction)
    prompt = f"{instruction}\n{extra}" if extra.strip() else instruction
    messages = []
    system = _optional_str(row, "system")
    if system.strip():
        messages.append({"role": "system", "content": system})
    history = row.get("history") or []
    if isinstance(history, str):
        history = _parse_literal(history, "history")
    if not isinstance(history, list):
        raise RowError("wrong_type", f"field 'history' is {_type_name(history)}")
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RowError("wrong_type", f"history[{i}] is not a [query, response] pair")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return {"messages": check_messages(messages)}


def from_sharegpt(row: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """conversations -> messages. Turn shapes: {from, value}, {role, content}, {human, assistant}.

    Options: `conversations_key`, `role_key`, `content_key`, `role_map` (merged over the default
    map: human/user -> user, gpt/chatgpt/bot/assistant -> assistant, system -> system).
    """
    key = options.get("conversations_key", "conversations")
    conversation = get_field(row, key, (list, str))
    if isinstance(conversation, str):
        conversation = _parse_literal(conversation, key)
        if not isinstance(conversation, list):
            raise RowError("wrong_type", f"field {key!r} does not decode to a list")
    role_map = {**DEFAULT_ROLE_MAP, **(options.get("role_map") or {})}
    messages: list[dict[str, Any]] = []
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(conversation):
        if not isinstance(turn, Mapping):
            raise RowError("wrong_type", f"{key}[{i}] is {_type_name(turn)}")
        if "human" in turn and "assistant" in turn and "from" not in turn:
            # huangjintao/sharegpt stores each round as one {human, assistant} dict.
            messages += [
                {"role": "user", "content": turn["human"]},
                {"role": "assistant", "content": turn["assistant"]},
            ]
            continue
        role_key = options.get("role_key") or ("from" if "from" in turn else "role")
        content_key = options.get("content_key") or ("value" if "value" in turn else "content")
        if role_key not in turn:
            raise RowError("missing_field", f"{key}[{i}].{role_key}")
        role = turn[role_key]
        mapped = role_map.get(role) if isinstance(role, str) else None
        if mapped is None:
            raise RowError("unknown_role", f"{key}[{i}] has {_describe_role(role)}")
        if content_key not in turn:
            raise RowError("missing_field", f"{key}[{i}].{content_key}")
        messages.append({"role": mapped, "content": turn[content_key]})
    return {"messages": check_messages(messages)}


def from_classification(row: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """text (+ text_pair), label (int index or str name).

    Option `keep_fields`: extra str/int/float fields copied through when present (e.g. the
    `domain` of vader-sentiment rows); other fields are dropped.
    """
    text = get_field(row, "text")
    if not text.strip():
        raise RowError("empty_turn", "field 'text' is empty")
    label = get_field(row, "label", (int, str))
    out: dict[str, Any] = {"text": text, "label": label}
    if "text_pair" in row:
        out["text_pair"] = get_field(row, "text_pair")
    for key in options.get("keep_fields") or ():
        if key in row:
            out[key] = get_field(row, key, (str, int, float))
    return out


def from_ner(row: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """tokens and tags: equal-length lists of strings."""
    tokens = get_field(row, "tokens", list)
    tags = get_field(row, "tags", list)
    if not tokens:
        raise RowError("empty_turn", "field 'tokens' is an empty list")
    if len(tokens) != len(tags):
        raise RowError("wrong_type", f"{len(tokens)} tokens but {len(tags)} tags")
    for name, values in (("tokens", tokens), ("tags", tags)):
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise RowError("wrong_type", f"{name}[{i}] is {_type_name(value)}")
    return {"tokens": list(tokens), "tags": list(tags)}


def from_image_caption(row: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """image (path or {"path": ...}) + caption -> a one-turn chat with an <image> placeholder."""
    image = get_field(row, "image", (str, dict))
    path = image.get("path") if isinstance(image, dict) else image
    if not isinstance(path, str) or not path:
        raise RowError("missing_field", "field 'image.path'")
    caption = get_field(row, "caption")
    separator = options.get("caption_separator")
    if separator and separator in caption:
        caption = caption.split(separator)[0]
    prompt = options.get("prompt", "please describe the image.")
    messages = [{"role": "user", "content": f"<image>{prompt}"}, {"role": "assistant", "content": caption}]
    return {"messages": check_messages(messages), "images": [path]}


def from_image_classification(row: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """image (uint8 array (H, W) or (H, W, C), C in 1/3/4) + label (int >= 0; numpy ints accepted).

    Option `labels` (class names, index = label): a label outside it is a `bad_label`.
    Reasons: `wrong_type` (image not a uint8 numpy array, label not an integer), `wrong_shape`
    (not 2-D/3-D, channel count not 1/3/4, no pixels), `bad_label` (negative or out of range).
    """
    image = get_field(row, "image", np.ndarray)
    if image.dtype != np.uint8:
        raise RowError("wrong_type", f"field 'image' has dtype {image.dtype}, expected uint8")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise RowError(
            "wrong_shape", f"field 'image' has shape {image.shape}, expected (H, W) or (H, W, C) with C 1/3/4"
        )
    if image.size == 0:
        raise RowError("wrong_shape", f"field 'image' has no pixels (shape {image.shape})")
    label = get_field(row, "label", (int, np.integer))
    label = int(label)
    names = options.get("labels")
    if label < 0 or (names and label >= len(names)):
        raise RowError(
            "bad_label", f"label {label} is negative" if label < 0 else f"label {label} >= {len(names)} classes"
        )
    return {"image": image, "label": label}


CONVERTERS: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]] = {
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "messages": from_messages,
    "classification": from_classification,
    "ner": from_ner,
    "image-caption": from_image_caption,
    "image-classification": from_image_classification,
}
from deltatune.data.preference import CONVERTERS as _PREFERENCE_CONVERTERS  # noqa: E402 (needs the helpers above)

CONVERTERS.update(_PREFERENCE_CONVERTERS)


def rename_columns(row: Mapping[str, Any], columns: Mapping[str, str] | None) -> dict[str, Any]:
    """Apply a catalogue `columns` map {source_name: canonical_name}; other keys pass through."""
    if not columns:
        return dict(row)
    # A renamed column wins over a same-named original (medical-en maps input -> instruction
    # while also carrying an unrelated "instruction" column).
    out = {k: v for k, v in row.items() if k not in columns and k not in columns.values()}
    for source, target in columns.items():
        if source in row:
            out[target] = row[source]
        elif target in row:
            out[target] = row[target]
    return out


def detect_format(row: Mapping[str, Any]) -> str | None:
    """Guess a local file's format from one row's keys; None when nothing fits."""
    keys = set(row)
    from deltatune.data.preference import detect as detect_preference

    preference = detect_preference(keys)
    if preference:
        return preference
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys or {"query", "response"} <= keys:
        return "alpaca"
    if {"tokens", "tags"} <= keys:
        return "ner"
    if {"text", "label"} <= keys:
        return "classification"
    if {"image", "caption"} <= keys:
        return "image-caption"
    if {"image", "label"} <= keys:
        return "image-classification"
    return None


def convert(row: Any, fmt: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Rename columns per `options["columns"]`, then convert one row to its canonical form.

    Raises:
        RowError: the row is not a JSON object, or the converter rejects it.
    """
    if not isinstance(row, Mapping):
        raise RowError("wrong_type", f"row is {_type_name(row)}, expected an object")
    options = options or {}
    return CONVERTERS[fmt](rename_columns(row, options.get("columns")), options)

"""Preference, KTO and prompt-only rows: converters, the offline demo set, and tokenization.

Canonical forms (what `deltatune rlhf` trains on):
- preference:  {"prompt": [messages ending with a user turn], "chosen": str, "rejected": str}
- kto:         {"prompt": [messages ending with a user turn], "completion": str, "label": bool}
- prompt-only: {"prompt": [messages ending with a user turn], "answer": str | None}

Accepted source shapes (the validation report counts every rejected row by reason):
- `prompt` as a string (one user turn) or a message list, or `messages` (a message list) as the
  prompt; `chosen` / `rejected` / `completion` as strings;
- `chosen` and `rejected` as whole conversations (message lists, as UltraFeedback binarized
  stores them): the prompt is their shared turns before the last assistant turn, which must agree;
- `chosen` and `rejected` as "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts (Anthropic hh-rlhf):
  split into turns, then as above.
- prompt-only rows take the answer to check from `answer` / `solution` (optional), or from a
  trailing assistant turn of `messages`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any

from deltatune.data.formats import _type_name, check_messages, get_field
from deltatune.data.report import DataReport, RowError

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _as_prompt(value: Any, key: str) -> list[dict[str, str]]:
    """A prompt (str or message list ending with a user turn) -> validated messages."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty_turn", f"field {key!r} is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise RowError("wrong_type", f"field {key!r} is {_type_name(value)}")
    if not value:
        raise RowError("empty_turn", f"field {key!r} is an empty list")
    last = value[-1]
    if not (isinstance(last, Mapping) and last.get("role") == "user"):
        raise RowError("bad_turn_order", f"field {key!r} does not end with a user turn")
    # validate roles/order by closing the prompt with a placeholder answer
    clean = check_messages([*value, {"role": "assistant", "content": "."}])
    return clean[:-1]


def _hh_turns(text: str, key: str) -> list[dict[str, str]]:
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if len(parts) < 3:
        raise RowError("wrong_type", f"field {key!r} is not a Human:/Assistant: transcript")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]


def _split_conversation(value: list, key: str) -> tuple[list[dict[str, str]], str]:
    messages = check_messages(value)
    return messages[:-1], messages[-1]["content"]


def _unwrap(value: Any) -> Any:
    """A single ShareGPT-style turn ({"from": "gpt", "value": ...} or {"role", "content"}) -> its text."""
    if isinstance(value, Mapping):
        for key in ("value", "content"):
            if isinstance(value.get(key), str):
                return value[key]
    return value


def _normalise_turns(value: Any) -> Any:
    """ShareGPT turns ({from, value}) -> {role, content}; other values unchanged."""
    if not isinstance(value, list):
        return value
    from deltatune.data.formats import DEFAULT_ROLE_MAP

    out = []
    for turn in value:
        if isinstance(turn, Mapping) and "from" in turn and "value" in turn:
            role = DEFAULT_ROLE_MAP.get(turn["from"]) if isinstance(turn["from"], str) else None
            if role is None:
                raise RowError("unknown_role", "a prompt turn has an unknown 'from' value")
            turn = {"role": role, "content": turn["value"]}
        out.append(turn)
    return out


def from_preference(row: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """prompt|messages + chosen + rejected -> {"prompt", "chosen", "rejected"}."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise RowError("missing_field", f"field {key!r}")
        if row[key] is None:
            raise RowError("null_value", f"field {key!r}")
    chosen, rejected = _unwrap(row["chosen"]), _unwrap(row["rejected"])
    if options.get("transcript") == "hh" and isinstance(chosen, str) and isinstance(rejected, str):
        chosen, rejected = _hh_turns(chosen, "chosen"), _hh_turns(rejected, "rejected")
    given = _normalise_turns(row.get("prompt", row.get("messages", row.get("conversations"))))
    chosen, rejected = _normalise_turns(chosen), _normalise_turns(rejected)
    if isinstance(chosen, list) and isinstance(rejected, list):
        prompt_c, chosen = _split_conversation(chosen, "chosen")
        prompt_r, rejected = _split_conversation(rejected, "rejected")
        if prompt_c != prompt_r:
            raise RowError("prompt_mismatch", "chosen and rejected conversations differ before the last answer")
        prompt = prompt_c
        if isinstance(given, list) and given:  # an explicit prompt list wins when the answers are bare
            prompt = _as_prompt(given, "prompt")
        elif not prompt:
            prompt = _as_prompt(given, "prompt") if given is not None else []
        if not prompt:
            raise RowError("missing_field", "field 'prompt'")
    else:
        if given is None:
            raise RowError("missing_field", "field 'prompt'")
        prompt = _as_prompt(given, "prompt" if "prompt" in row else "messages")
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                raise RowError("wrong_type", f"field {key!r} is {_type_name(value)}")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            raise RowError("empty_turn", f"field {key!r} is empty")
    if chosen == rejected:
        raise RowError("same_answers", "chosen and rejected are the same text")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def from_kto(row: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """prompt|messages + completion + label (bool) -> {"prompt", "completion", "label"}."""
    given = row.get("prompt", row.get("messages"))
    if given is None:
        raise RowError("missing_field", "field 'prompt'")
    prompt = _as_prompt(given, "prompt")
    completion = get_field(row, "completion")
    if not completion.strip():
        raise RowError("empty_turn", "field 'completion' is empty")
    label = get_field(row, "label", bool)
    return {"prompt": prompt, "completion": completion, "label": label}


def from_prompt_only(row: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """prompt|messages (+ answer / solution) -> {"prompt", "answer"}."""
    given = row.get("prompt", row.get("messages"))
    if given is None:
        raise RowError("missing_field", "field 'prompt'")
    answer = row.get("answer", row.get("solution"))
    if isinstance(given, list) and given and isinstance(given[-1], Mapping) and given[-1].get("role") == "assistant":
        messages = check_messages(given)
        given, answer = messages[:-1], answer if answer is not None else messages[-1]["content"]
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise RowError("wrong_type", f"field 'answer' is {_type_name(answer)}")
    return {"prompt": _as_prompt(given, "prompt"), "answer": None if answer is None else str(answer)}


CONVERTERS = {"preference": from_preference, "kto": from_kto, "prompt-only": from_prompt_only}


def detect(keys: set[str]) -> str | None:
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"completion", "label"} <= keys:
        return "kto"
    if "prompt" in keys and not keys & {"chosen", "rejected", "completion", "output"}:
        return "prompt-only"
    return None


# -- the offline demo set ------------------------------------------------------------------------------
def load_chatterbot_preference(options: Mapping[str, Any]) -> tuple[list[tuple[Any, str]], list[str]]:
    """Preference pairs built from chatterbot-corpus (no network): for each unique (question, answer)
    pair, chosen = the corpus' own answer, rejected = the answer the corpus gives to a different,
    randomly drawn question (seeded), never one of this question's own answers.

    This is an honest, checkable preference signal (on-topic vs off-topic answer) for a demo; it is
    not human preference data."""
    from deltatune.data.builtin import load_chatterbot

    rows, notes = load_chatterbot({"language": options.get("language", "english")})
    pairs = [(r["messages"][0]["content"], r["messages"][1]["content"], where) for r, where in rows]
    answers_of: dict[str, set[str]] = {}
    for question, answer, _ in pairs:
        answers_of.setdefault(question, set()).add(answer)
    rng = random.Random(int(options.get("seed", 0)))
    out = []
    for question, answer, where in pairs:
        for _ in range(20):
            other_q, other_a, _ = pairs[rng.randrange(len(pairs))]
            if other_q != question and other_a not in answers_of[question]:
                break
        else:
            continue
        out.append(({"prompt": question, "chosen": answer, "rejected": other_a}, where))
    notes.append(
        f"preference pairs: chosen = the corpus answer, rejected = the answer to another question ({len(out)} rows)"
    )
    return out, notes


def load_chatterbot_kto(options: Mapping[str, Any]) -> tuple[list[tuple[Any, str]], list[str]]:
    """KTO rows from the same pairs: each preference pair gives a desirable row (the corpus answer,
    label true) and an undesirable one (the off-topic answer, label false)."""
    rows, notes = load_chatterbot_preference(options)
    out = []
    for row, where in rows:
        out.append(({"prompt": row["prompt"], "completion": row["chosen"], "label": True}, where))
        out.append(({"prompt": row["prompt"], "completion": row["rejected"], "label": False}, where + "#rejected"))
    notes.append(f"kto rows: {len(out)} (half desirable)")
    return out, notes


def arithmetic_prompts(options: Mapping[str, Any]) -> tuple[list[tuple[Any, str]], list[str]]:
    """A verifiable prompt-only task for GRPO: 'What is A + B? Answer with the number.', answer A+B."""
    rng = random.Random(int(options.get("seed", 0)))
    n, top = int(options.get("rows", 1000)), int(options.get("max", 20))
    out = []
    for i in range(n):
        a, b = rng.randrange(top), rng.randrange(top)
        out.append(({"prompt": f"What is {a} + {b}? Answer with the number only.", "answer": str(a + b)}, f"#{i}"))
    return out, [f"arithmetic prompts: {n} sums of two numbers below {top}"]


# -- tokenization ----------------------------------------------------------------------------------------
def encode_answer(tokenizer: Any, prompt: list[dict[str, str]], answer: str, max_length: int) -> dict | None:
    """prompt + one assistant answer, tokenized with the chat template; only the answer (and its
    end-of-turn) supervised; truncation cuts the answer, never the closing token."""
    from deltatune.data.tokenization import encode_chat

    return encode_chat(tokenizer, [*prompt, {"role": "assistant", "content": answer}], max_length=max_length)


def encode_pairs(tokenizer: Any, rows: list[dict[str, Any]], max_length: int) -> tuple[list[dict], DataReport]:
    """Preference rows -> {"chosen": {input_ids, labels}, "rejected": {...}} examples (dropped rows counted)."""
    report = DataReport(source="tokenization")
    out = []
    for i, row in enumerate(rows):
        report.total += 1
        try:
            chosen = encode_answer(tokenizer, row["prompt"], row["chosen"], max_length)
            rejected = encode_answer(tokenizer, row["prompt"], row["rejected"], max_length)
        except RowError as err:
            report.add(err.reason, f"row {i}", err.detail)
            continue
        if chosen is None or rejected is None:
            report.add("labels_fully_masked", f"row {i}", f"the prompt leaves no answer token within {max_length}")
            continue
        out.append({"chosen": chosen, "rejected": rejected})
    report.kept = len(out)
    return out, report

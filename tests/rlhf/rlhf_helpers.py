"""Preference rows on the synthetic arithmetic chat data of tests/train/train_helpers.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

from train_helpers import WORDS


def preference_rows(n: int = 64, seed: int = 0) -> list[dict]:
    """chosen = the right sum, rejected = a wrong one (different lengths: '!' tails)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({
            "prompt": f"add {WORDS[a]} and {WORDS[b]}" + " please" * rng.randrange(2),
            "chosen": f"{WORDS[a]} plus {WORDS[b]} is {a + b}" + "!" * rng.randrange(3),
            "rejected": f"{WORDS[b]} plus {WORDS[a]} is {(a + b + 3) % 19}",
        })  # fmt: skip
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def letter_e(completions: list[str], answers: list) -> list[float]:
    """A dense test reward on a random tiny model: the share of characters that are 'e'."""
    return [c.count("e") / max(len(c), 1) for c in completions]

"""Word tokens for metrics and filters, in scripts that do and do not put spaces between words.

Chinese and Japanese are written without spaces, so `text.split()` sees a whole sentence as one
"word" and `\\w+` sees a whole clause: ROUGE-L then scores 0 for any answer that is not
character-for-character the reference. Here each CJK ideograph or kana is one token (ROUGE on
characters, the usual choice for Chinese); runs of other letters and digits stay whole words.
Korean Hangul is written with spaces, so it stays word-level.
"""

from __future__ import annotations

import re

_CJK = (
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3400-\u4dbf"  # CJK Unified Ideographs Extension A
    "\u4e00-\u9fff"  # CJK Unified Ideographs
    "\uf900-\ufaff"  # CJK Compatibility Ideographs
    "\U00020000-\U0003134f"  # Extensions B-G
)
_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


def words(text: str) -> list[str]:
    """Lower-cased tokens: each CJK character alone, other word characters in runs.

    >>> words("Hello, World 42")
    ['hello', 'world', '42']
    >>> words("我喜欢Python!")
    ['我', '喜', '欢', 'python']
    """
    return _TOKEN.findall(text.lower())


def word_count(text: str) -> int:
    """How many tokens `words` finds (2 for "你好", 2 for "hello there")."""
    return len(words(text))

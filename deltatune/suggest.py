"""'did you mean ...?' for names a user typed: commands, flags, models, data sets, tuners, fields."""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Iterable


def closest(word: str, choices: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The choice most like `word` (case-insensitive), or None when nothing is close."""
    by_lower = {str(c).lower(): str(c) for c in choices}
    match = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=cutoff)
    return by_lower[match[0]] if match else None


def did_you_mean(word: str, choices: Iterable[str], *, cutoff: float = 0.6) -> str:
    """'did you mean 'X'? ' (with a trailing space) or '' - ready to put inside a message.

    >>> did_you_mean("chaterbot-en", ["chatterbot-en", "digits"])
    "did you mean 'chatterbot-en'? "
    >>> did_you_mean("xyz", ["chatterbot-en"])
    ''
    """
    match = closest(word, choices, cutoff=cutoff)
    return f"did you mean {match!r}? " if match is not None and match != word else ""


class SuggestingParser(argparse.ArgumentParser):
    """argparse that adds 'did you mean ...?' to unknown-flag and invalid-choice errors."""

    def error(self, message: str):  # type: ignore[override]
        super().error(message + usage_hint(message, self))


def usage_hint(message: str, parser: argparse.ArgumentParser) -> str:
    """' (did you mean '--max-steps'?)' for an argparse error message, or ''."""
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        options = re.findall(r"'([^']*)'", choice.group(2)) or [c.strip() for c in choice.group(2).split(",")]
        hint = did_you_mean(choice.group(1), options)
        return f" ({hint.strip()})" if hint else ""
    unknown = re.search(r"unrecognized arguments: (.*)", message)
    if unknown:
        flags = _option_strings(parser)
        for word in unknown.group(1).split():
            if word.startswith("--"):
                hint = did_you_mean(word.split("=", 1)[0], flags)
                if hint:
                    return f" ({hint.strip()})"
    return ""


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    flags: set[str] = set()
    for action in parser._actions:  # noqa: SLF001 - argparse exposes no public walk
        flags.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for sub in action.choices.values():
                flags |= _option_strings(sub)
    return flags

"""Pure target selection, with peft's rules.

- `target_modules` as a list: a module is targeted when its full name equals an entry or ends
  with "." + entry. `layers_to_transform` / `layers_pattern` then restrict by layer index.
- as a string: the regex must match the *whole* module name (re.fullmatch).
- "all-linear": every linear layer except the model's output head, expanded to exact names.
- `exclude_modules` (same list/str rules) removes modules first.

`explain` turns an empty or partial match into a message that lists the real names nearby.

Regexes come from config files, so matching is bounded: the `regex` engine (memoizes, and takes a
time limit) runs each match under MATCH_TIMEOUT_S, and a pattern that exceeds it is a ConfigError
naming the pattern, instead of a run that hangs on catastrophic backtracking.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import regex

from deltatune.core.config import ConfigError, TunerConfig

MATCH_TIMEOUT_S = 2.0
"""Longest time one regex may take on one module name."""


def fullmatch(pattern: str, name: str, *, field: str = "target_modules") -> bool:
    """True when `pattern` matches the whole `name`, within MATCH_TIMEOUT_S.

    Raises:
        ConfigError: the pattern took too long (names the field and the pattern).
    """
    try:
        return regex.fullmatch(pattern, name, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError:
        raise ConfigError(
            f"{field}={pattern!r} took more than {MATCH_TIMEOUT_S:g} s to match the module name {name!r} "
            "(catastrophic backtracking, e.g. nested repeats like (.*)*); simplify the regex, e.g. r'.*\\.q_proj', "
            "or give a list of module names"
        ) from None


def _matches_spec(name: str, spec: Sequence[str] | str) -> bool:
    if isinstance(spec, str):
        return fullmatch(spec, name)
    return name in spec or any(name.endswith("." + key) for key in spec)


def _layer_index(name: str, layers_pattern: Sequence[str] | str | None) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if not patterns:
        found = re.match(r".*\.[^.]*\.(\d+)\.", name)
        return int(found.group(1)) if found else None
    for pattern in patterns:
        try:
            found = regex.match(rf".*\.{pattern}\.(\d+)\.", name, timeout=MATCH_TIMEOUT_S)
        except TimeoutError:
            raise ConfigError(f"layers_pattern={pattern!r} took too long to match {name!r}; simplify it") from None
        if found:
            return int(found.group(1))
    return None


def is_excluded(name: str, config: TunerConfig) -> bool:
    return bool(config.exclude_modules) and _matches_spec(name, config.exclude_modules)


def is_target(name: str, config: TunerConfig, target_modules: Sequence[str] | str | None = None) -> bool:
    """peft's check_target_module_exists, as a pure function of the module name."""
    spec = config.target_modules if target_modules is None else target_modules
    if spec is None or is_excluded(name, config):
        return False
    if isinstance(spec, str):
        return fullmatch(spec, name)
    if name in spec:
        return True
    if not any(name.endswith("." + key) for key in spec):
        return False
    layers = config.layers_to_transform
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(name, config.layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def is_in_scope(name: str, config: TunerConfig) -> bool:
    """For tuners that select parameters: an unset target_modules means every module."""
    if config.target_modules is None:
        return not is_excluded(name, config)
    return is_target(name, config)


@dataclass
class Match:
    """Result of matching a config against a model's module names."""

    targets: list[str]
    """Module names selected, in model order."""
    per_pattern: dict[str, int]
    """For list-form target_modules: how many modules each entry selected."""


def find_targets(
    names: Sequence[str], config: TunerConfig, target_modules: Sequence[str] | str | None = None
) -> Match:
    """Select target module names; never raises (see `check_match` for the error policy)."""
    spec = config.target_modules if target_modules is None else target_modules
    targets = [n for n in names if n and is_target(n, config, spec)]
    per_pattern: dict[str, int] = {}
    if isinstance(spec, list):
        for key in spec:
            per_pattern[key] = sum(1 for n in targets if n == key or n.endswith("." + key))
    return Match(targets=targets, per_pattern=per_pattern)


def check_match(match: Match, names: Sequence[str], config: TunerConfig, *, field_name: str = "target_modules") -> None:
    """Error if nothing matched (listing real names), warn if some list entries matched nothing."""
    spec = getattr(config, field_name)
    if not match.targets:
        raise ConfigError(explain(names, spec, config, field_name=field_name))
    empty = [key for key, count in match.per_pattern.items() if count == 0]
    if empty:
        table = "\n".join(f"  {key!r:<30} {count:>5}" for key, count in match.per_pattern.items())
        warnings.warn(
            f"{field_name}: {empty} matched no module while other entries did; modules matched per entry:\n{table}",
            stacklevel=3,
        )


def leaf_names(names: Iterable[str]) -> list[str]:
    """Distinct last components of module names, sorted ("q_proj", "v_proj", ...)."""
    return sorted({n.rsplit(".", 1)[-1] for n in names if n})


def explain(names: Sequence[str], spec: Sequence[str] | str | None, config: TunerConfig, *, field_name: str) -> str:
    """Message for a target spec that matched nothing: what was asked, what exists, what is close."""
    leaves = leaf_names(names)
    asked = [spec] if isinstance(spec, str) or spec is None else list(spec)
    close: list[str] = []
    for key in asked:
        if key is None:
            continue
        tail = key.rsplit(".", 1)[-1]
        close += difflib.get_close_matches(tail, leaves, n=5, cutoff=0.4)
    parts = [f"{field_name}={spec!r} matched no module of this model."]
    if config.exclude_modules:
        parts.append(f"(exclude_modules={config.exclude_modules!r} was applied first.)")
    if config.layers_to_transform is not None:
        parts.append(f"(layers_to_transform={config.layers_to_transform!r} restricts by layer index.)")
    if close:
        parts.append(f"Closest module names: {sorted(set(close))}.")
    shown = leaves if len(leaves) <= 40 else leaves[:40] + [f"... {len(leaves) - 40} more"]
    parts.append(f"Module names in this model: {shown}.")
    if isinstance(spec, str) and spec != "all-linear":
        parts.append("A string is a regex that must match the whole dotted name, e.g. r'.*\\.q_proj'.")
    else:
        parts.append("List entries match a full dotted name or its last components, e.g. 'q_proj'.")
    return " ".join(parts)


def expand_all_linear(linear_names: Sequence[str], output_head: str | None) -> list[str]:
    """peft's "all-linear": the exact names of all linear layers except the output head."""
    chosen = [n for n in linear_names if n != output_head]
    if not chosen:
        raise ConfigError("target_modules='all-linear' found no linear layer (other than the output head)")
    return chosen

"""Parsing of `--tuner-args KEY=VALUE,...` and `--config FILE.yaml`.

Values parse as JSON where possible (`r=16`, `use_dora=true`, `rank_pattern={"q": 4}`), lists may
be written bare (`target_modules=[q_proj,v_proj]`), anything else is a string
(`target_modules=all-linear`). Commas inside brackets/braces do not split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from deltatune.core.config import ConfigError


def _split_top_level(text: str) -> list[str]:
    parts, depth, current, quote = [], 0, [], None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if quote or depth:
        raise ConfigError(f"--tuner-args {text!r}: unbalanced brackets or quotes")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_value(text: str) -> Any:
    """JSON if it parses; a bare [a,b] list of JSON-or-strings; else the string itself."""
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    if text.startswith("[") and text.endswith("]"):
        return [parse_value(item) for item in _split_top_level(text[1:-1])]
    return text


def parse_tuner_args(text: str) -> dict[str, Any]:
    """'r=16,target_modules=[q_proj,v_proj]' -> {'r': 16, 'target_modules': ['q_proj', 'v_proj']}."""
    out: dict[str, Any] = {}
    for part in _split_top_level(text):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"--tuner-args: {part!r} is not KEY=VALUE (e.g. r=16,target_modules=[q_proj,v_proj])")
        if key in out:
            raise ConfigError(f"--tuner-args: {key} given twice")
        out[key] = parse_value(value)
    return out


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML mapping of sft settings (yaml.safe_load: data only, no tags)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings at the top level")
    if isinstance(data.get("tuner_args", data.get("tuner-args")), str):
        key = "tuner_args" if "tuner_args" in data else "tuner-args"
        data[key] = parse_tuner_args(data[key])
    return data

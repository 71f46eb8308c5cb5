"""The model catalogue: `catalog.yaml` parsed into checked `ModelSpec` records.

The YAML is data only (yaml.safe_load: no tags, no objects). Every section is checked here
against an allowlist of keys and types, role maps must define every role and name modules with
non-empty strings, and each entry's family, role map, chat template and asset must exist, so a
typo in the catalogue fails on the first lookup with the entry and key named.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from deltatune.assets import SMOLLM2, GgufAsset
from deltatune.models.templates import TEMPLATE_NAMES


class CatalogError(ValueError):
    """The model catalogue is malformed; the message names the entry and the key."""


ROLES = ("attention_qv", "attention_kv", "attention_qkv", "attention_output", "mlp", "mlp_output", "all_linear")
TASKS = {"causal-lm": "CAUSAL_LM", "vision-language": "CAUSAL_LM"}
"""Catalogue task -> the task_type a tuner config gets (Qwen-VL loads as a causal LM)."""
ASSETS: dict[str, GgufAsset] = {"smollm2": SMOLLM2}
"""Offline assets an entry may name (the catalogue cannot point at arbitrary objects)."""

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_FAMILY_FIELDS: dict[str, tuple[type, ...]] = {
    "architecture": (str,),
    "roles": (str,),
    "chat_template": (str,),
    "task": (str,),
    "requires_remote_code": (bool,),
}
_MODEL_FIELDS: dict[str, tuple[type, ...]] = {
    "family": (str,),
    "hf_id": (str, type(None)),
    "ms_id": (str, type(None)),
    "asset": (str, type(None)),
    "notes": (str, type(None)),
    **_FAMILY_FIELDS,
}
_TOP = {"role_maps", "tuners", "families", "models"}


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry (family defaults already applied); see catalog.yaml's header."""

    name: str
    hf_id: str | None
    family: str
    task_type: str = "CAUSAL_LM"
    default_targets: tuple[str, ...] = ("q_proj", "v_proj")
    """LoRA targets used when --tuner-args gives none (the `lora` row of the tuner defaults)."""
    asset: GgufAsset | None = None
    """Offline source of the same weights, if any."""
    ms_id: str | None = None
    architecture: str = "llama"
    """The transformers model_type of the checkpoint."""
    task: str = "causal-lm"
    chat_template: str | None = None
    """Name of the fallback template (deltatune/models/templates/), used when the tokenizer has none."""
    requires_remote_code: bool = False
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """role -> module names (peft list rules: exact name or ".suffix")."""
    tuner_targets: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    """tuner -> config field -> module names, for fields the user left unset."""
    notes: str | None = None

    def targets_for(self, tuner: str) -> dict[str, list[str]]:
        """{config field: module names} defaults for `tuner` ({} when the catalogue has none)."""
        return {key: list(names) for key, names in self.tuner_targets.get(tuner, {}).items()}


def _check_fields(where: str, entry: Any, fields: dict[str, tuple[type, ...]], required: tuple[str, ...]) -> None:
    if not isinstance(entry, dict):
        raise CatalogError(f"{where} must be a mapping, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(fields))
    if unknown:
        raise CatalogError(f"{where}: unknown keys {unknown}; allowed: {sorted(fields)}")
    missing = [key for key in required if key not in entry]
    if missing:
        raise CatalogError(f"{where}: missing keys {missing}")
    for key, value in entry.items():
        if not isinstance(value, fields[key]):
            raise CatalogError(f"{where}: {key} must be {fields[key][0].__name__}, got {type(value).__name__}")


def _module_names(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise CatalogError(f"{where} must be a non-empty list of module names, got {value!r}")
    bad = [v for v in value if not isinstance(v, str) or not v.strip() or v != v.strip()]
    if bad:
        raise CatalogError(f"{where}: every target must be a non-empty string without spaces, got {bad!r}")
    return tuple(value)


def _parse_role_maps(raw: Any) -> dict[str, dict[str, tuple[str, ...]]]:
    if not isinstance(raw, dict) or not raw:
        raise CatalogError("catalog.yaml: role_maps must be a non-empty mapping")
    maps = {}
    for name, roles in raw.items():
        where = f"role map {name!r}"
        if not isinstance(roles, dict):
            raise CatalogError(f"{where} must map roles to module names")
        unknown = sorted(set(roles) - set(ROLES))
        missing = [r for r in ROLES if r not in roles]
        if unknown or missing:
            raise CatalogError(f"{where}: unknown roles {unknown}, missing roles {missing}; roles are {list(ROLES)}")
        maps[str(name)] = {role: _module_names(f"{where}.{role}", roles[role]) for role in ROLES}
    return maps


def _parse_tuners(raw: Any) -> dict[str, dict[str, tuple[str, ...]]]:
    if not isinstance(raw, dict) or not isinstance(raw.get("lora"), dict) or "target_modules" not in raw["lora"]:
        raise CatalogError("catalog.yaml: tuners must be a mapping with a lora.target_modules row")
    tuners = {}
    for tuner, fields in raw.items():
        if not isinstance(fields, dict) or not fields:
            raise CatalogError(f"tuners.{tuner} must map config fields to role lists")
        for key, roles in fields.items():
            for role in _module_names(f"tuners.{tuner}.{key}", roles):
                if role not in ROLES:
                    raise CatalogError(f"tuners.{tuner}.{key}: unknown role {role!r}; roles are {list(ROLES)}")
        tuners[str(tuner)] = {str(k): tuple(v) for k, v in fields.items()}
    return tuners


def _resolve_tuner_targets(
    tuners: dict[str, dict[str, tuple[str, ...]]], roles: dict[str, tuple[str, ...]]
) -> dict[str, dict[str, tuple[str, ...]]]:
    out = {}
    for tuner, fields in tuners.items():
        out[tuner] = {}
        for key, role_names in fields.items():
            names: list[str] = []
            for role in role_names:
                names += [n for n in roles[role] if n not in names]
            out[tuner][key] = tuple(names)
    return out


def parse_catalog(raw: Any) -> dict[str, ModelSpec]:
    """A parsed catalog.yaml document -> {name: ModelSpec}, checked.

    Raises:
        CatalogError: unknown or missing keys, wrong types, unknown family / role map / template /
            asset / task, an entry without any hub id or asset, a malformed name.
    """
    if not isinstance(raw, dict):
        raise CatalogError("catalog.yaml must be a mapping with sections role_maps, tuners, families, models")
    unknown = sorted(set(raw) - _TOP)
    missing = sorted(_TOP - set(raw))
    if unknown or missing:
        raise CatalogError(f"catalog.yaml: unknown sections {unknown}, missing sections {missing}")
    role_maps = _parse_role_maps(raw["role_maps"])
    tuners = _parse_tuners(raw["tuners"])
    if not isinstance(raw["families"], dict) or not isinstance(raw["models"], dict):
        raise CatalogError("catalog.yaml: families and models must be mappings")
    families = {}
    for name, family in raw["families"].items():
        _check_fields(f"family {name!r}", family, _FAMILY_FIELDS, tuple(_FAMILY_FIELDS))
        families[str(name)] = family
    specs = {}
    for name, entry in raw["models"].items():
        name = str(name)
        where = f"model {name!r}"
        if not _NAME.fullmatch(name):
            raise CatalogError(f"{where}: names are lowercase [a-z0-9._-], starting with a letter or digit")
        _check_fields(where, entry, _MODEL_FIELDS, ("family",))
        if entry["family"] not in families:
            raise CatalogError(f"{where}: unknown family {entry['family']!r}; families: {sorted(families)}")
        merged = {**families[entry["family"]], **entry}
        if merged["roles"] not in role_maps:
            raise CatalogError(f"{where}: unknown role map {merged['roles']!r}; role maps: {sorted(role_maps)}")
        if merged["chat_template"] not in TEMPLATE_NAMES:
            raise CatalogError(f"{where}: unknown chat_template {merged['chat_template']!r}; have {TEMPLATE_NAMES}")
        if merged["task"] not in TASKS:
            raise CatalogError(f"{where}: task must be one of {sorted(TASKS)}, got {merged['task']!r}")
        asset = merged.get("asset")
        if asset is not None and asset not in ASSETS:
            raise CatalogError(f"{where}: unknown asset {asset!r}; assets: {sorted(ASSETS)}")
        if not (merged.get("hf_id") or merged.get("ms_id") or asset):
            raise CatalogError(f"{where}: needs hf_id, ms_id or an asset")
        roles = role_maps[merged["roles"]]
        tuner_targets = _resolve_tuner_targets(tuners, roles)
        specs[name] = ModelSpec(
            name=name,
            hf_id=merged.get("hf_id"),
            family=merged["family"],
            task_type=TASKS[merged["task"]],
            default_targets=tuner_targets["lora"]["target_modules"],
            asset=ASSETS[asset] if asset else None,
            ms_id=merged.get("ms_id"),
            architecture=merged["architecture"],
            task=merged["task"],
            chat_template=merged["chat_template"],
            requires_remote_code=merged["requires_remote_code"],
            roles=roles,
            tuner_targets=tuner_targets,
            notes=merged.get("notes"),
        )
    return specs


@functools.cache
def load_catalog() -> dict[str, ModelSpec]:
    """Parse and check the packaged catalog.yaml (cached; it never changes at run time)."""
    text = resources.files("deltatune.models").joinpath("catalog.yaml").read_text(encoding="utf-8")
    return parse_catalog(yaml.safe_load(text))

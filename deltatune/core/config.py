"""TunerConfig: the base of every tuner's configuration.

A config is plain data: it is validated when built, round-trips through JSON, and never touches a
model. Field names follow `peft` wherever `peft` has the concept, so an `adapter_config.json`
written by either library reads in the other.

Unknown-key policy when reading a file (``from_dict``):
- bookkeeping keys `peft` writes (version, auto mapping, ...) are accepted silently;
- keys a tuner declares as "unsupported" (features of `peft` we do not implement) are accepted
  when they hold their neutral value and refused otherwise, since ignoring them would change
  the adapter's meaning;
- any other unknown key gives one warning listing them all.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

# Keys peft writes into adapter_config.json that carry no meaning for the adapter's math.
PEFT_BOOKKEEPING_KEYS = frozenset(
    {"peft_version", "auto_mapping", "revision", "inference_mode", "base_model_name_or_path", "peft_type"}
)

TASK_TYPES = frozenset(
    {"CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"}
)


class ConfigError(ValueError):
    """A tuner configuration value is invalid; the message names the field and the fix."""


def check_adapter_name(name: str) -> str:
    """Return ``name`` if it is a safe adapter name (also used as a folder name), else raise."""
    if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"invalid adapter name {name!r}: use 1-64 characters from [A-Za-z0-9_-], starting with a "
            "letter or digit, e.g. 'v1_0' (names become folder names and module keys, so '/', '.' and spaces "
            "are refused)"
        )
    return name


@dataclass(kw_only=True)
class TunerConfig:
    """Fields shared by every tuner: what to target and what the adapter is for."""

    tuner_name: ClassVar[str] = ""
    """Registry name, e.g. "lora"."""
    peft_type: ClassVar[str] = ""
    """The `peft_type` written to adapter_config.json, e.g. "LORA"."""
    sidecar_fields: ClassVar[frozenset[str]] = frozenset()
    """Fields `peft` does not know; saved to deltatune_config.json so `peft` loads our files cleanly."""
    unsupported_peft_keys: ClassVar[dict[str, Any]] = {}
    """peft-only keys accepted only while they hold their neutral value (given here)."""
    run_defaults: ClassVar[dict[str, Any]] = {}
    """Values `deltatune sft` uses for fields the user leaves unset (a library call keeps the field defaults)."""

    task_type: str | None = None
    """What the model is trained for (peft's TaskType names: CAUSAL_LM, SEQ_CLS, ...)."""
    target_modules: list[str] | str | None = None
    """List: exact module names or name suffixes after a '.'; str: a regex that must match the whole
    module name; "all-linear": every linear layer except the output head."""
    exclude_modules: list[str] | str | None = None
    """Same rules as target_modules; a module matched here is never targeted."""
    layers_to_transform: list[int] | int | None = None
    """Only target modules inside these layer indices (list-form target_modules only)."""
    layers_pattern: list[str] | str | None = None
    """Name of the layer container (e.g. "layers", "h") used to read the layer index."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. a classification head)."""
    inference_mode: bool = False
    """True once loaded for inference: no parameter of this adapter requires grad."""
    base_model_name_or_path: str | None = None
    """Where the base model came from (informational)."""
    revision: str | None = None
    """Hub revision of the base model (informational)."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field. Subclasses extend and call super()."""
        for f in fields(self):
            bad = _non_finite(getattr(self, f.name))
            if bad is not None:
                raise ConfigError(f"{f.name}={bad} is not a finite number; give a real value")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError(f"task_type={self.task_type!r} is unknown; use one of {sorted(TASK_TYPES)}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                if isinstance(value, str) and value != "all-linear":
                    _check_regex(name, value)
                continue
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{name} must be a list of non-empty module names or a regex string, got {value!r}")
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list) or not all(isinstance(v, str) for v in self.modules_to_save)
        ):
            raise ConfigError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        layers = self.layers_to_transform
        if layers is not None:
            items = [layers] if isinstance(layers, int) else layers
            if not isinstance(items, list) or not all(isinstance(i, int) and i >= 0 for i in items):
                raise ConfigError(f"layers_to_transform must be a layer index or list of indices >= 0, got {layers!r}")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("layers_pattern only applies together with layers_to_transform; set both or neither")

    # -- serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All fields (ours and peft's) plus the type keys, JSON-ready."""
        out = {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}
        out["peft_type"] = self.peft_type
        out["tuner"] = self.tuner_name
        return out

    def to_peft_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split into (adapter_config.json content, sidecar content)."""
        full = self.to_dict()
        full.pop("tuner")
        sidecar = {k: full.pop(k) for k in list(full) if k in self.sidecar_fields}
        sidecar["tuner"] = self.tuner_name
        return full, sidecar

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TunerConfig:
        """Build from a dict read from JSON (see the module docstring for the unknown-key policy)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in PEFT_BOOKKEEPING_KEYS or key == "tuner":
                continue
            elif key in cls.unsupported_peft_keys:
                neutral = cls.unsupported_peft_keys[key]
                if value not in (neutral, None) and not (value == {} or value == [] or value is False):
                    raise ConfigError(
                        f"{source}: field {key}={value!r} uses a peft feature deltatune does not implement; "
                        f"loading it would silently change the adapter. Remove it or set it to {neutral!r}"
                    )
            else:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown {cls.__name__} keys {sorted(unknown)}", stacklevel=2)
        for name, ftype in ((f.name, f.type) for f in fields(cls)):
            if name in kwargs:
                _check_type(cls, name, ftype, kwargs[name], source)
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @property
    def is_prompt_learning(self) -> bool:
        """peft's flag: True for tuners that rewrite the model's inputs (prompt / prefix tuning, P-tuning)."""
        from deltatune.core.registry import spec_for_config

        return spec_for_config(self).kind == "input"

    def warn_on_load(self, source: str) -> None:
        """Hook for tuners whose saved adapters need a caveat when loaded (default: none)."""

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> TunerConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _non_finite(value: Any) -> str | None:
    """repr of the first NaN/inf in a value (numbers, and inside lists/dicts), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        for key, item in value.items():
            found = _non_finite(item)
            if found is not None:
                return f"{{{key!r}: {found}}}"
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _non_finite(item)
            if found is not None:
                return f"[... {found} ...]"
    return None


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{name}={pattern!r} is not a valid regular expression: {exc}") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return value


_SIMPLE_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str}


def _check_type(cls: type, name: str, declared: str | type, value: Any, source: str) -> None:
    """Reject obviously wrong JSON types (e.g. r="8") before any tensor is built."""
    text = declared if isinstance(declared, str) else getattr(declared, "__name__", str(declared))
    if value is None and "None" in text:
        return
    simple = _SIMPLE_TYPES.get(text.strip())
    if simple is None:
        return
    ok = isinstance(value, simple) and not (simple is not bool and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{source}: field {name} of {cls.__name__} must be {text}, got {value!r}")


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a config dataclass (used as CLI help), read from its source."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


__all__ = ["TunerConfig", "ConfigError", "check_adapter_name", "field_docs", "field", "TASK_TYPES"]

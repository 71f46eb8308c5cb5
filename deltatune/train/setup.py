"""From names to objects: the tuner config of a run, and the structural fingerprint of a run.

Validation happens here, before any weights load: unknown tuner-args keys list the valid fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from deltatune.core.config import ConfigError, TunerConfig, field_docs
from deltatune.core.registry import get_spec
from deltatune.models import ModelSpec
from deltatune.suggest import did_you_mean

# Config fields that describe where an adapter came from, not what it computes.
_NON_STRUCTURAL = {"inference_mode", "base_model_name_or_path", "revision"}


def tuner_fields(tuner: str) -> dict[str, str]:
    """{field name: help text} of a tuner's config."""
    config_cls = get_spec(tuner).config
    docs = field_docs(config_cls)
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(config_cls)}


def config_from_args(tuner: str, tuner_args: dict[str, Any], defaults: dict[str, Any]) -> TunerConfig:
    """A tuner's config from --tuner-args, with `defaults` filling fields the user left unset.

    Raises:
        ConfigError: unknown tuner, unknown field (listing the valid ones), invalid value.
    """
    spec = get_spec(tuner)
    valid = tuner_fields(tuner)
    unknown = sorted(set(tuner_args) - set(valid))
    if unknown:
        raise ConfigError(
            f"--tuner-args: unknown {spec.name} field(s) {unknown}; {did_you_mean(unknown[0], valid)}"
            f"valid fields: {', '.join(sorted(valid))}"
        )
    kwargs = dict(tuner_args)
    for name, value in {**spec.config.run_defaults, **defaults}.items():
        if name in valid and kwargs.get(name) is None:
            kwargs[name] = value
    try:
        return spec.config(**kwargs)
    except TypeError as err:
        raise ConfigError(f"--tuner-args: {err}") from None


def build_tuner_config(tuner: str, tuner_args: dict[str, Any], model_spec: ModelSpec | None) -> TunerConfig:
    """The tuner config of a run: tuner_args over the model's default targets and task type.

    The model registry knows each family's layer names per tuner (by role); a model it does not
    know gets every linear layer for layer-adapting tuners, and input/side/select tuners choose
    what they touch from their own fields.
    """
    return config_from_args(tuner, tuner_args, default_fields(tuner, model_spec))


def default_fields(tuner: str, model_spec: ModelSpec | None) -> dict[str, Any]:
    """The registry's defaults of a causal LM run: targets by role, else every linear layer."""
    spec = get_spec(tuner)
    defaults: dict[str, Any] = dict(model_spec.targets_for(spec.name)) if model_spec else {}
    if model_spec is None and spec.kind == "delta" and "linear" in spec.dispatch:  # not e.g. trainable_tokens
        defaults["target_modules"] = "all-linear"
    defaults["task_type"] = model_spec.task_type if model_spec else "CAUSAL_LM"
    return defaults


def structural(config: TunerConfig, **extra: Any) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint (compared key by key)."""
    tuner = {k: v for k, v in config.to_dict().items() if k not in _NON_STRUCTURAL}
    return {**extra, "tuner_config": tuner}


def diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Lines "key: old -> new" for every differing (nested) key."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += diff(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines

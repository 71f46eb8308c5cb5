"""Part: train the parameters whose names match a pattern, and nothing else.

Partial fine-tuning (e.g. the last few blocks, or every attention output projection) is the
simplest baseline for parameter-efficient methods: y = f(x; θ_frozen, θ_selected + Δ). A "select"
tuner: each adapter keeps its own copy of the chosen tensors, used in place of the base ones, so
adapters switch and disable exactly and merging copies them into the base model.

`target_parameters` follows target_modules' rules over *parameter* names: a str is a regex that
must match the whole dotted name (r".*\\.layers\\.1\\..*"), a list entry matches a full name or its
last components ("o_proj.weight"). A tensor tied across modules (an input embedding shared with the
output head) is trained as one tensor wherever it is used and saved once, under its first name.
The file is deltatune's own: keys "<module>.<param>", peft_type "PART".
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from deltatune.core import matching
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import ParamSite, TunerSpec


@dataclass(kw_only=True)
class PartConfig(TunerConfig):
    """Train the parameters matching `target_parameters` (in modules in scope of target_modules)."""

    tuner_name = "part"
    peft_type = "PART"
    run_defaults = {"target_parameters": r".*\.(layers|h|layer|blocks)\.0\..*"}  # the first block
    sidecar_fields = frozenset(
        {"target_parameters", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"}
    )

    target_parameters: list[str] | str | None = None
    """Parameter names to train: a regex matching the whole dotted name, or a list of names / name
    suffixes after a '.'."""

    def validate(self) -> None:
        super().validate()
        value = self.target_parameters
        if value is None:
            raise ConfigError(
                "target_parameters is not set; give a regex over parameter names, e.g. r'.*\\.layers\\.1\\..*'"
            )
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise ConfigError(f"target_parameters={value!r} is not a valid regular expression: {exc}") from None
        elif not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"target_parameters must be a regex string or a list of parameter names, got {value!r}")


def select(config: PartConfig, sites: list[ParamSite]) -> list[str]:
    wanted = config.target_parameters
    chosen = [
        s.name
        for s in sites
        if matching.is_in_scope(s.module_name, config) and matching.is_target(s.name, config, wanted)
    ]
    if not chosen:
        names = [s.name for s in sites]
        asked = [wanted] if isinstance(wanted, str) else wanted
        close = sorted({c for key in asked for c in difflib.get_close_matches(key, names, n=5, cutoff=0.4)})
        shown = names if len(names) <= 40 else names[:40] + [f"... {len(names) - 40} more"]
        raise ConfigError(
            f"target_parameters={wanted!r} matched no parameter of this model"
            f"{f' in target_modules={config.target_modules!r}' if config.target_modules is not None else ''}."
            f"{f' Closest: {close}.' if close else ''} Parameter names: {shown}. A str is a regex that must "
            "match the whole dotted name, e.g. r'.*\\.bias'."
        )
    return chosen


SPEC = TunerSpec(
    name="part",
    kind="select",
    config=PartConfig,
    peft_type="PART",
    select=select,
    example_configs=(
        # the second block of the transformers models, or one named layer of the toy models
        {"target_parameters": r".*(\.1\.|lin1|conv2|proj\.).*"},
    ),
)

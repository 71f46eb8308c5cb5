"""Full fine-tuning as a tuner: every parameter trains, y = f(x; θ + Δ).

The reference point every parameter-efficient method is measured against, in the same API: it
saves, loads, switches, disables and merges like the others. A "select" tuner: each adapter keeps
its own copy of every parameter in scope (so memory for weights doubles per adapter, plus optimizer
state for all of them), used in place of the base ones; the base tensors never change until merged.

Scope: every parameter, narrowed by target_modules / exclude_modules. Parameters held directly by
a module with submodules (ViT's cls_token) cannot be replaced and are refused with the module to
exclude. A tensor tied across modules is trained as one and saved once, under its first name.
The file is deltatune's own: keys "<module>.<param>", peft_type "FULL".
"""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.core import matching
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import ParamSite, TunerSpec


@dataclass(kw_only=True)
class FullConfig(TunerConfig):
    """Train every parameter in scope (target_modules unset: the whole model)."""

    tuner_name = "full"
    peft_type = "FULL"
    sidecar_fields = frozenset({"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"})


def select(config: FullConfig, sites: list[ParamSite]) -> list[str]:
    chosen = [s.name for s in sites if matching.is_in_scope(s.module_name, config)]
    if not chosen:
        raise ConfigError(
            f"full fine-tuning selected no parameter (target_modules={config.target_modules!r}, "
            f"exclude_modules={config.exclude_modules!r}). Parameters here: {[s.name for s in sites][:40]}"
        )
    return chosen


SPEC = TunerSpec(
    name="full",
    kind="select",
    config=FullConfig,
    peft_type="FULL",
    select=select,
    example_configs=({},),
)

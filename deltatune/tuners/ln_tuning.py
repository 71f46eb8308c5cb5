"""LN-tuning: train only the normalization layers' scale and shift. Zhao et al. 2023,
https://arxiv.org/abs/2312.11420.

For every norm layer y = γ ⊙ norm(x) + β in scope, γ and β train and everything else stays frozen:
2 * hidden values per LayerNorm (1 * hidden per RMSNorm), the smallest footprint of the tuners
here. A "select" tuner: each adapter keeps its own copy of the chosen tensors, used in place of the
base ones, so adapters switch and disable exactly and merging copies them into the base layer.

Scope: with target_modules unset, peft's default list for the model type when peft has one
(filled in by TunedModel, models/peft_targets.py), else every module whose class name contains
"Norm" (LayerNorm, RMSNorm, T5LayerNorm, GroupNorm, BatchNorm...); with target_modules set, all
parameters of the modules it matches (peft's rules). Files are peft's LN_TUNING format: keys
"<module>.ln_tuning_layers.<param>", and target_modules written as the exact module names, so peft
loads them (peft has no default norm-layer list for most models).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltatune.core import matching
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import ParamSite, TunerSpec


@dataclass(kw_only=True)
class LNTuningConfig(TunerConfig):
    """Train the norm layers in scope (target_modules unset: every norm layer of the model)."""

    tuner_name = "ln_tuning"
    peft_type = "LN_TUNING"
    sidecar_fields = frozenset({"layers_to_transform", "layers_pattern"})


def is_norm_layer(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__


def select(config: LNTuningConfig, sites: list[ParamSite]) -> list[str]:
    if config.target_modules is None:
        chosen = [s.name for s in sites if is_norm_layer(s.module) and matching.is_in_scope(s.module_name, config)]
    else:
        chosen = [s.name for s in sites if s.module_name and matching.is_in_scope(s.module_name, config)]
    if not chosen:
        norms = sorted({s.module_name for s in sites if is_norm_layer(s.module)})
        raise ConfigError(
            f"LN-tuning selected no parameter (target_modules={config.target_modules!r}). "
            f"Norm layers in this model: {norms[:40] or 'none'}"
        )
    return chosen


def prepare(model: nn.Module, config: LNTuningConfig, names: list[str]) -> LNTuningConfig:
    """Write the chosen modules as exact names, so peft (which has no norm-layer default for most
    models, and no layers_to_transform for LN_TUNING) wraps the same modules."""
    modules = list(dict.fromkeys(n.rpartition(".")[0] for n in names))
    if config.target_modules is None or config.layers_to_transform is not None:
        return config.replace(target_modules=modules, layers_to_transform=None, layers_pattern=None)
    return config


SPEC = TunerSpec(
    name="ln_tuning",
    kind="select",
    config=LNTuningConfig,
    peft_type="LN_TUNING",
    select=select,
    prepare=prepare,
    store_as="ln_tuning_layers",
    paper="https://arxiv.org/abs/2312.11420",
    example_configs=({},),
)

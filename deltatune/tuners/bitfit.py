"""BitFit: train only the bias terms. Ben Zaken et al. 2021, https://arxiv.org/abs/2106.10199.

For every layer y = W x + b in scope, W stays frozen and b trains: y = W x + b', b' = b + Δb. The
paper finds that on BERT-sized models this ~0.1% of the parameters recovers most of full
fine-tuning on GLUE. A "select" tuner: each adapter keeps its own copy of the chosen biases, used in
place of the base ones (the base tensors never change), so adapters switch and disable exactly and
merging copies the trained biases into the base layer.

Scope: every module with a `bias` parameter, narrowed by target_modules / exclude_modules (peft's
rules). Models without biases (Llama, T5) have nothing to train; use LN-tuning or Part there.
The file is deltatune's own (peft has no BitFit): keys "<module>.bias", peft_type "BITFIT".
"""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.core import matching
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import ParamSite, TunerSpec


@dataclass(kw_only=True)
class BitFitConfig(TunerConfig):
    """Train the bias of every module in scope (target_modules unset: the whole model)."""

    tuner_name = "bitfit"
    peft_type = "BITFIT"
    sidecar_fields = frozenset({"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"})


def select(config: BitFitConfig, sites: list[ParamSite]) -> list[str]:
    biases = [s for s in sites if s.name.rpartition(".")[2] == "bias"]
    chosen = [s.name for s in biases]
    in_scope = [s.name for s in biases if matching.is_in_scope(s.module_name, config)]
    if not in_scope:
        where = f" in target_modules={config.target_modules!r}" if config.target_modules is not None else ""
        raise ConfigError(
            f"BitFit found no bias parameter{where}. Biases in this model: {chosen[:40] or 'none'}"
            f"{' (use LNTuningConfig or PartConfig on models without biases, e.g. Llama, T5)' if not chosen else ''}"
        )
    return in_scope


SPEC = TunerSpec(
    name="bitfit",
    kind="select",
    config=BitFitConfig,
    peft_type="BITFIT",
    select=select,
    paper="https://arxiv.org/abs/2106.10199",
    example_configs=({},),
)

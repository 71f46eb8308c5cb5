"""Default targets per transformers `model_type`, for configs that leave `target_modules` unset.

peft fills `target_modules` (and IA3's `feedforward_modules`) from per-model-type tables when a
config leaves them None; a peft user's code relies on that, so deltatune does the same, with the
same tables (data copied from peft 0.21, `peft/utils/constants.py`, Apache-2.0), keyed by the
tuner's `peft_type`. A model type peft has no row for falls back to this package's model
registry (catalog.yaml's per-tuner role defaults, by `architecture`). Whatever is chosen is logged
at WARNING level, naming the fields and values, and written to the saved config.

Tuners not listed here (and "select" tuners other than LN-tuning) keep their own meaning of an
unset target_modules.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("deltatune")

_LORA: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

_IA3: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}

_IA3_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}

_LN_TUNING: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "llava": ["multi_modal_projector", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens", "lm_head"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "gptj": ["ln_1", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm", "norm"],
    "gemma3_text": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
}  # fmt: skip


_ADALORA: dict[str, list[str] | str] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

_VBLORA = {**_ADALORA, "roberta": ["query", "value"]}


def _lora_with(**changes: list[str]) -> dict[str, list[str] | str]:
    return {**_LORA, **changes}


_VERA = _lora_with(phi=["q_proj", "v_proj"])

TABLES: dict[str, dict[str, dict[str, Any]]] = {
    # peft_type -> model_type -> {config field: default}
    "LORA": {m: {"target_modules": t} for m, t in _LORA.items()},
    "IA3": {m: {"target_modules": t, "feedforward_modules": _IA3_FEEDFORWARD.get(m, [])} for m, t in _IA3.items()},
    "LN_TUNING": {m: {"target_modules": t} for m, t in _LN_TUNING.items()},
    **{
        kind: {m: {"target_modules": t} for m, t in _LORA.items()}
        for kind in ("LOHA", "LOKR", "OFT", "BOFT", "HRA", "BONE", "MISS", "RANDLORA", "POLY", "ROAD", "DELORA", "C3A")
    },
    "VERA": {m: {"target_modules": t} for m, t in _VERA.items()},
    "ADALORA": {m: {"target_modules": t} for m, t in _ADALORA.items()},
    "VBLORA": {m: {"target_modules": t} for m, t in _VBLORA.items()},
    "FOURIERFT": {
        m: {"target_modules": t} for m, t in _lora_with(gpt2=["mlp.c_proj"], gpt_bigcode=["mlp.c_proj"]).items()
    },
    "SHIRA": {m: {"target_modules": t} for m, t in _lora_with(phi=["q_proj", "v_proj"]).items()},
}
"""Per peft_type, the defaults peft fills in (the same table for every LoRA-like method, as peft)."""


def model_type(model: Any) -> str | None:
    config = getattr(model, "config", None)
    value = getattr(config, "model_type", None)
    if value is None and isinstance(config, dict):
        value = config.get("model_type")
    return value if isinstance(value, str) else None


def _registry_defaults(tuner_name: str, kind: str | None) -> dict[str, list[str]]:
    """Defaults from the model registry's role map for an architecture, if an entry has one."""
    if kind is None:
        return {}
    try:
        from deltatune.models.registry import list_models
    except Exception:  # noqa: BLE001 - the registry is optional here (yaml missing, catalogue error)
        return {}
    for spec in list_models():
        if spec.architecture == kind:
            found = spec.targets_for(tuner_name)
            if found.get("target_modules"):
                return found
    return {}


def defaults_for(model: Any, peft_type: str, tuner_name: str) -> tuple[dict[str, Any], str]:
    """({field: default}, where it came from) for a model and tuner; ({}, "") when none is known."""
    kind = model_type(model)
    table = TABLES.get(peft_type)
    if table is None:
        return {}, ""
    if kind in table:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in table[kind].items()}, f"peft's {peft_type} table"
    found = _registry_defaults(tuner_name, kind)
    return (found, "the model registry (catalog.yaml)") if found else ({}, "")


def fill_default_targets(model: Any, config: Any) -> Any:
    """`config` with target_modules (and its companion fields) filled for `model`'s type when unset,
    logging what was chosen; the config unchanged when set, or when no default is known."""
    if getattr(config, "target_modules", "set") is not None:
        return config
    found, source = defaults_for(model, type(config).peft_type, type(config).tuner_name)
    if not found:
        return config
    changes = {k: v for k, v in found.items() if getattr(config, k, None) is None}
    if "target_modules" not in changes:
        return config
    logger.warning(
        "%s.target_modules is unset; using the defaults for model type %r from %s: %s",
        type(config).__name__, model_type(model), source,
        ", ".join(f"{k}={v!r}" for k, v in changes.items()),
    )  # fmt: skip
    return config.replace(**changes)

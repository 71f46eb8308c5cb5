"""The model table and the one place a base model / tokenizer is loaded.

`M` on the command line is, in this order: a registry name (below), an existing local folder,
or a Hugging Face hub id. Hub loading is ordinary `from_pretrained(repo_id)` and fails with a
one-line ModelError when the hub is unreachable. `trust_remote_code` is only ever what the
caller passes (the CLI flag); nothing read from a file turns it on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.assets import SMOLLM2, AssetError, GgufAsset, is_available, prepare


class ModelError(ValueError):
    """A model cannot be found or loaded; the message names it and the fix."""


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry."""

    name: str
    hf_id: str
    family: str
    task_type: str = "CAUSAL_LM"
    default_targets: tuple[str, ...] = ("q_proj", "v_proj")
    """LoRA targets used when --tuner-args gives none."""
    asset: GgufAsset | None = None
    """Offline source of the same weights, if any."""


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "llama", asset=SMOLLM2),
    ]
}

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def list_models() -> list[ModelSpec]:
    return list(MODELS.values())


def get_model_spec(name: str) -> ModelSpec | None:
    return MODELS.get(name.lower())


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "DELTATUNE_OFFLINE")
    )


def resolve_model(name: str, *, log=print) -> tuple[str, ModelSpec | None]:
    """Registry name / folder / hub id -> (what from_pretrained gets, the registry entry or None).

    Raises:
        ModelError: a registry model with no offline asset while offline, or an asset that fails.
    """
    spec = get_model_spec(name)
    if spec is not None:
        if spec.asset is not None and is_available(spec.asset):
            try:
                return str(prepare(spec.asset, log=log)), spec
            except AssetError as err:
                raise ModelError(str(err)) from None
        if spec.asset is not None and _offline():
            raise ModelError(f"model {name!r} is offline-capable but not installed: {spec.asset.install}")
        return spec.hf_id, spec
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a folder without config.json; give a transformers model folder")
        return str(path), None
    if path.exists():
        raise ModelError(f"{path} is a file; give a model folder, a registry name or a hub id")
    if name.count("/") != 1 or name.startswith((".", "/")):
        known = ", ".join(MODELS)
        raise ModelError(f"model {name!r} is not a registry name ({known}), a local folder, or a hub id (owner/name)")
    return name, None


def _hub_error(source: str, err: Exception) -> ModelError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelError(
        f"could not load {source!r}: {first[:300]}; offline, use a registry name "
        f"({', '.join(MODELS)}) or a local folder"
    )


def load_tokenizer(source: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(source, err) from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # masking is positional, so pad == eos is safe
    return tokenizer


def load_config(source: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(source, err) from None


def load_model(
    source: str,
    *,
    dtype: str = "fp32",
    quantize: str | None = None,
    trust_remote_code: bool = False,
    task_type: str = "CAUSAL_LM",
) -> Any:
    """Load a base model for fine-tuning or inference.

    Args:
        source: a folder or hub id (see resolve_model).
        dtype: "fp32", "bf16" or "fp16" for the frozen base weights.
        quantize: None, "4bit" (NF4, double quant) or "8bit" via bitsandbytes.
    """
    import torch
    import transformers

    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    kwargs: dict[str, Any] = {"dtype": getattr(torch, DTYPES[dtype]), "trust_remote_code": trust_remote_code}
    if quantize is not None:
        if quantize not in ("4bit", "8bit"):
            raise ModelError(f"quantize must be '4bit' or '8bit', got {quantize!r}")
        compute = getattr(torch, DTYPES[dtype])
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=quantize == "4bit",
            load_in_8bit=quantize == "8bit",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    auto = {"CAUSAL_LM": transformers.AutoModelForCausalLM, "SEQ_CLS": transformers.AutoModelForSequenceClassification}
    try:
        model = auto.get(task_type, transformers.AutoModelForCausalLM).from_pretrained(source, **kwargs)
    except ImportError as err:
        raise ModelError(f"loading {source!r} needs a missing package: {err}") from None
    except (OSError, ValueError) as err:
        raise _hub_error(source, err) from None
    return model

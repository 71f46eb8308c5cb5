"""Name -> weights, and the one place a base model / tokenizer / config is loaded.

`M` on the command line is, in this order: a registry name (catalog.yaml, `deltatune models`), an
existing local folder, or a Hugging Face hub id. A registry name resolves to, in order: a
downloaded copy in `$DELTATUNE_CACHE/models/NAME` (default ~/.cache/deltatune), the entry's
offline asset, then its hub id. Hub loading is ordinary `from_pretrained(repo_id)` and fails with a
one-line ModelError when the hub is unreachable.

Remote code: `trust_remote_code` is only ever what the caller passes (the CLI flag); nothing read
from a file turns it on. A checkpoint that needs its own Python (a registry entry marked
requires_remote_code, or a folder whose config.json has an `auto_map` for a model type transformers
does not know) is refused before anything is downloaded or imported unless the caller opted in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from deltatune.assets import AssetError, cache_root, is_available, prepare
from deltatune.models.catalog import ModelSpec, load_catalog
from deltatune.models.reach import hub_cache_folder, offline_reason
from deltatune.models.templates import template_text
from deltatune.suggest import did_you_mean


class ModelError(ValueError):
    """A model cannot be found or loaded; the message names it and the fix."""


class RemoteCodeError(ModelError):
    """The checkpoint runs its own Python code and the caller did not pass trust_remote_code."""


MODELS: dict[str, ModelSpec] = load_catalog()

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def list_models() -> list[ModelSpec]:
    """Every registry entry, in catalogue order."""
    return list(MODELS.values())


def get_model_spec(name: str) -> ModelSpec | None:
    return MODELS.get(name.lower())


def local_dir(spec: ModelSpec) -> Path:
    """Where a downloaded copy of a registry model is looked for: $DELTATUNE_CACHE/models/NAME."""
    return cache_root() / "models" / spec.name


def is_offline_available(spec: ModelSpec) -> bool:
    """True when the model loads with no network: a local copy, or an installed offline asset."""
    if (local_dir(spec) / "config.json").is_file():
        return True
    return spec.asset is not None and is_available(spec.asset)


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "DELTATUNE_OFFLINE")
    )


def _refuse_remote_code(what: str, reason: str) -> RemoteCodeError:
    return RemoteCodeError(
        f"{what} needs --trust-remote-code: {reason}, which runs Python files from the checkpoint on "
        "this machine; read them, then pass --trust-remote-code (trust_remote_code=True in Python) "
        "only if you trust their authors"
    )


def resolve_model(
    name: str, *, log=print, trust_remote_code: bool | None = None, hub: str | None = None
) -> tuple[str, ModelSpec | None]:
    """Registry name / folder / hub id -> (what from_pretrained gets, the registry entry or None).

    Args:
        trust_remote_code: when False, a registry entry that needs remote code is refused here,
            before any download; None leaves the check to load_model / load_tokenizer.
        hub: "modelscope" (or DELTATUNE_HUB=ms) downloads hub ids and registry entries from
            ModelScope (deltatune/export/download.py); so does an `ms://` / `modelscope://` name.

    Raises:
        RemoteCodeError: see trust_remote_code.
        ModelError: a registry model with no offline copy while offline, an asset that fails, an
            entry with no Hugging Face id, a folder without config.json, a malformed name.
    """
    from deltatune.export import download as modelscope

    ms_id = modelscope.modelscope_id(name)
    if ms_id is None and modelscope.wants_modelscope(hub) and get_model_spec(name) is None:
        ms_id = None if Path(name).expanduser().exists() else name  # a hub id, asked of ModelScope
    if ms_id is not None:
        return str(modelscope.download_model(ms_id, trust_remote_code=bool(trust_remote_code), log=log)), None
    spec = get_model_spec(name)
    twin = None if spec is not None else _registry_twin(name)
    if twin is not None and is_offline_available(twin) and (why := offline_reason()) is not None:
        log(f"{name}: the hub is not reachable ({why}); using the registry's offline copy {twin.name!r}")
        spec = twin
    if spec is not None:
        if trust_remote_code is False and spec.requires_remote_code:
            raise _refuse_remote_code(f"model {spec.name!r}", f"the {spec.family} family ships its own modeling code")
        local = local_dir(spec)
        if (local / "config.json").is_file():
            return str(local), spec
        if spec.asset is not None and is_available(spec.asset):
            try:
                return str(prepare(spec.asset, log=log)), spec
            except AssetError as err:
                raise ModelError(str(err)) from None
        if spec.asset is not None and _offline():
            raise ModelError(f"model {name!r} is offline-capable but not installed: {spec.asset.install}")
        if spec.ms_id is not None and (spec.hf_id is None or modelscope.wants_modelscope(hub)):
            folder = modelscope.download_model(spec.ms_id, trust_remote_code=bool(trust_remote_code), log=log)
            return str(folder), spec
        if spec.hf_id is None:
            raise ModelError(
                f"model {name!r} is published on ModelScope only ({spec.ms_id}); download it into {local} "
                "(e.g. `modelscope download --model ID --local_dir DIR`) and run again"
            )
        return spec.hf_id, spec
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a folder without config.json; give a transformers model folder")
        return str(path), None
    if path.exists():
        raise ModelError(f"{path} is a file; give a model folder, a registry name or a hub id")
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise ModelError(
            f"model {name!r} is not a registry name (`deltatune models` lists them), a local folder, "
            f"or a hub id (owner/name); {did_you_mean(name, MODELS)}".rstrip("; ")
        )
    return name, None


def _registry_twin(hub_id: str) -> ModelSpec | None:
    """The registry entry published under this hub id (Hugging Face or ModelScope), if any."""
    wanted = hub_id.lower()
    return next((s for s in MODELS.values() if wanted in ((s.hf_id or "").lower(), (s.ms_id or "").lower())), None)


def hub_source(source: str) -> str:
    """`source` if it is a folder or the hub answers; else the hub id's copy in the Hugging Face cache.

    Raises:
        ModelError: the hub is unreachable (or offline mode is on) and nothing is cached: one line,
            at once, instead of a minute of retries.
    """
    if Path(source).expanduser().is_dir():
        return source
    why = offline_reason()
    if why is None:
        return source
    cached = hub_cache_folder(source)
    if cached is not None:
        return cached
    raise ModelError(
        f"could not load {source!r}: the hub is not reachable ({why}) and it is not in the Hugging Face cache; "
        "use a local folder, download it on a connected machine, or a registry model that is available "
        "offline (`deltatune models`)"
    )


def spec_for_source(source: str) -> ModelSpec | None:
    """The registry entry a resolved source (hub id, or a registry / asset folder) belongs to."""
    for spec in MODELS.values():
        if source in (spec.hf_id, spec.ms_id):
            return spec
    path = Path(source).expanduser()
    if not path.is_dir():
        return None
    path = path.resolve()
    for spec in MODELS.values():
        folders = [local_dir(spec)] + ([cache_root() / "models" / spec.asset.name] if spec.asset else [])
        if any(path == folder.expanduser().resolve() for folder in folders):
            return spec
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remote_code_reason(source: str) -> str | None:
    """Why loading `source` would run the checkpoint's own Python, or None if it would not."""
    spec = spec_for_source(source)
    if spec is not None and spec.requires_remote_code:
        return f"registry model {spec.name!r} ({spec.family} family) ships its own modeling code"
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return None  # an unknown hub id: transformers itself refuses custom code without the flag
    from transformers import CONFIG_MAPPING

    config = _read_json(folder / "config.json")
    model_type = config.get("model_type")
    if config.get("auto_map") and model_type not in CONFIG_MAPPING:
        return f"{folder / 'config.json'} maps model type {model_type!r} to Python files in the folder (auto_map)"
    tokenizer_map = _read_json(folder / "tokenizer_config.json").get("auto_map")
    if tokenizer_map and model_type not in CONFIG_MAPPING:
        return f"{folder / 'tokenizer_config.json'} maps its tokenizer to Python files in the folder (auto_map)"
    return None


def check_remote_code(source: str, *, trust_remote_code: bool) -> None:
    """Refuse a source that needs remote code unless the caller passed trust_remote_code.

    Raises:
        RemoteCodeError: the source needs remote code and trust_remote_code is False.
    """
    if trust_remote_code:
        return
    reason = remote_code_reason(source)
    if reason is not None:
        raise _refuse_remote_code(f"loading {source!r}", reason)


def _hub_error(source: str, err: Exception) -> ModelError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelError(
        f"could not load {source!r}: {first[:300]}; offline, use a local folder or a registry model "
        "that is available offline (`deltatune models`)"
    )


def load_tokenizer(source: str, *, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer; a registry model whose tokenizer has no chat template gets the entry's
    fallback template (deltatune/models/templates/), so every caller renders chats the same way.

    Raises:
        RemoteCodeError, ModelError: see check_remote_code, resolve_model.
    """
    from transformers import AutoTokenizer

    check_remote_code(source, trust_remote_code=trust_remote_code)
    where = hub_source(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(source, err) from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # masking is positional, so pad == eos is safe
    spec = spec_for_source(source)
    if spec is not None and spec.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template_text(spec.chat_template)
    return tokenizer


def load_config(source: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    check_remote_code(source, trust_remote_code=trust_remote_code)
    where = hub_source(source)
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
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
        trust_remote_code: allow the checkpoint's own Python code (see check_remote_code).

    Raises:
        RemoteCodeError: the checkpoint needs remote code and trust_remote_code is False.
        ModelError: bad dtype/quantize, a missing package, or the source cannot be loaded.
    """
    import torch
    import transformers

    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_remote_code(source, trust_remote_code=trust_remote_code)
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
    where = hub_source(source)
    try:
        model = auto.get(task_type, transformers.AutoModelForCausalLM).from_pretrained(where, **kwargs)
    except ImportError as err:
        raise ModelError(f"loading {source!r} needs a missing package: {err}") from None
    except (OSError, ValueError) as err:
        raise _hub_error(source, err) from None
    return model

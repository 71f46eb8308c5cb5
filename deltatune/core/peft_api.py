"""peft's low-level API and keyword arguments, with peft's names and meanings, on top of TunedModel.

A peft user's code calls more than `get_peft_model` and `PeftModel`: it injects adapters into a
plain module (`inject_adapter_in_model`), reads and writes adapter tensors under the file's keys
(`get_peft_model_state_dict` / `set_peft_model_state_dict`), moves base weights around with the
original key names (`get_base_model_state_dict` / `set_base_model_state_dict`), and passes keyword
arguments to our methods. Everything here is a thin layer over TunedModel; the only rule it adds
is that a keyword argument is either honoured with peft's meaning or refused with a TypeError /
ConfigError naming it, never silently dropped.
"""

from __future__ import annotations

import re
import warnings
from collections import namedtuple
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deltatune.core import inject
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.wrapper import DeltaWrapper

if TYPE_CHECKING:
    from deltatune.core.tuned_model import TunedModel

KEY_PREFIX = "base_model.model."
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
"""peft's names for the layers `save_embedding_layers="auto"` looks for in target_modules."""
IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])

_TUNED_ATTR = "_deltatune_tuned"
"""Where inject_adapter_in_model leaves the TunedModel that owns a plain module's adapters."""


# -- keyword arguments -------------------------------------------------------------------------
def refuse_unknown(method: str, kwargs: dict[str, Any], hint: str = "") -> None:
    """Raise TypeError for keyword arguments a method does not implement (peft's **kwargs catch-all)."""
    if kwargs:
        raise TypeError(
            f"{method}() got keyword argument(s) {sorted(kwargs)} that deltatune does not implement; "
            f"they would be silently ignored, so they are refused. Remove them{hint}"
        )


def refuse_value(method: str, name: str, value: Any, neutral: Any, why: str) -> None:
    """Refuse a peft keyword deltatune knows but does not implement, unless it holds peft's default."""
    if value != neutral:
        raise ConfigError(f"{method}({name}={value!r}) is not supported: {why}. Leave {name} at {neutral!r}")


def split_subfolder(model_id: Any, kwargs: dict[str, Any]) -> Any:
    """peft's `subfolder=`: the adapter lives in model_id/subfolder."""
    subfolder = kwargs.pop("subfolder", None)
    if not subfolder:
        return model_id
    from pathlib import Path

    return Path(model_id) / subfolder


def apply_key_mapping(tensors: dict[str, torch.Tensor], key_mapping: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """peft's `key_mapping=`: {regex: replacement} applied to every file key (module path part);
    the first pattern that matches a key rewrites it, as transformers' key_mapping does."""
    if not key_mapping:
        return tensors
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        for pattern, replacement in key_mapping.items():
            new, count = re.subn(pattern, replacement, key)
            if count:
                key = new
                break
        out[key] = value
    return out


# -- adapter dtype (autocast_adapter_dtype) ---------------------------------------------------------
def cast_to_base_dtype(model: nn.Module, adapter_name: str) -> None:
    """peft's `autocast_adapter_dtype=False`: each delta of `adapter_name` takes its base layer's
    floating dtype (bf16/fp16 bases keep bf16/fp16 adapters; quantized storage keeps fp32)."""
    for _, wrapper in inject.delta_wrappers(model):
        delta = wrapper.deltas[adapter_name] if adapter_name in wrapper.deltas else None
        if delta is None:
            continue
        weight = getattr(wrapper.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            weight = next(wrapper.base_layer.parameters(), None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            delta.to(dtype=weight.dtype)


# -- checks peft makes when an adapter is added / activated ---------------------------------------
def check_new_adapter(existing: dict[str, Any], config: TunerConfig) -> None:
    """peft refuses more than one adapter that trains base biases: the bias tensor is the base's own,
    so a second one would share (and retrain) it, and neither could be switched off."""
    biased = [name for name, a in existing.items() if getattr(a.config, "bias", "none") != "none"]
    if getattr(config, "bias", "none") != "none" and biased or len(biased) > 1:
        raise ConfigError(
            f"only one adapter may train base biases (bias != 'none'), and adapter {biased[0]!r} already does: "
            "biases are base tensors shared by all adapters. Set bias='none' on the new adapter (as peft requires)"
        )


def warn_trained_biases(adapters: dict[str, Any], active: list[str]) -> None:
    """peft's warning: disabling an adapter that trained base biases does not give the base outputs back."""
    for name in active:
        bias = getattr(adapters[name].config, "bias", "none") if name in adapters else "none"
        if bias != "none":
            warnings.warn(
                f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce the same "
                "output as the base model would without adaption (the trained biases are the base's own tensors).",
                stacklevel=3,
            )


def check_modules_to_save(model: nn.Module, names: list[str]) -> None:
    """Two active adapters that each keep a trained copy of one module: there is no composition of
    two full copies, so refuse (peft raises the same way) instead of letting the first win."""
    if len(names) < 2:
        return
    for path, saver in inject.save_wrappers(model):
        both = [n for n in names if n in saver.modules_to_save]
        if len(both) > 1:
            raise ConfigError(
                f"adapters {both} each keep their own trained copy of {path!r} (modules_to_save), and only one copy "
                "can run; activate one of them at a time"
            )


# -- state dicts with peft's keys ----------------------------------------------------------------------
def _tuned_of(model: nn.Module) -> TunedModel:
    from deltatune.core.tuned_model import TunedModel

    if isinstance(model, TunedModel):
        return model
    tuned = model.__dict__.get(_TUNED_ATTR)
    if tuned is None:
        raise ConfigError(
            f"{type(model).__name__} holds no deltatune adapter; build it with dt.get_tuned_model or "
            "dt.inject_adapter_in_model first"
        )
    return tuned


def inject_adapter_in_model(
    peft_config: TunerConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """peft's `inject_adapter_in_model`: add an adapter to `model` in place and return the model itself.

    The base is frozen and the adapter active, as with get_tuned_model, but no wrapper object is
    returned: read and write the adapter with get_peft_model_state_dict / set_peft_model_state_dict.
    Tuners that rewrite the model's inputs (prompt learning) need get_tuned_model, as in peft."""
    from deltatune.core.registry import spec_for_config
    from deltatune.core.tuned_model import TunedModel

    if not isinstance(peft_config, TunerConfig):
        raise ConfigError(f"expected a tuner config (e.g. LoraConfig), got {type(peft_config).__name__}")
    if spec_for_config(peft_config).kind == "input":
        raise ConfigError("inject_adapter_in_model does not support prompt learning tuners; use dt.get_tuned_model")
    if state_dict is not None:
        raise ConfigError(
            "inject_adapter_in_model(state_dict=...) (targets guessed from a checkpoint's keys) is not supported; "
            "set target_modules in the config"
        )
    tuned = model.__dict__.get(_TUNED_ATTR)
    if tuned is not None:
        tuned.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        tuned.set_adapter(list(dict.fromkeys(tuned.active_adapters + [adapter_name])))
        return model
    tuned = TunedModel(model, None, lean_activations=False)
    tuned.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
    tuned.set_adapter(adapter_name)
    model.__dict__[_TUNED_ATTR] = tuned
    return model


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """peft's `get_peft_model_state_dict`: one adapter's tensors under the file's keys
    ("base_model.model.<path>.<param>" for a TunedModel, "<path>.<param>" for a module given to
    inject_adapter_in_model, as peft; no adapter name). `state_dict`, when given, is a state dict of
    the same TunedModel (or injected module) whose values are used instead of the live ones."""
    tuned = _tuned_of(getattr(model, "_orig_mod", model) if unwrap_compiled else model)
    if adapter_name not in tuned.adapters:
        raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {sorted(tuned.adapters)}")
    tensors = tuned.adapter_state_dict(adapter_name)
    tensors.update(embedding_tensors(tuned, adapter_name, save_embedding_layers))
    bare = set(tuned.input_modules[adapter_name].file_tensors()) if adapter_name in tuned.input_modules else set()
    if state_dict is not None:
        tensors = values_from(tuned, model, adapter_name, tensors, bare, state_dict)
    # peft: a PeftModel's keys carry the prefix, a module given to inject_adapter_in_model's do not
    prefix = KEY_PREFIX if model is tuned else ""
    return {(key if key in bare else prefix + key): value for key, value in tensors.items()}


def values_from(tuned, model, adapter_name, tensors, bare, state_dict):
    """`tensors` (by file key) with their values taken from `state_dict`, a state dict of `model` (a TunedModel:
    keys "model.<path>...", or a module given to inject_adapter_in_model: "<path>...")."""
    prefix = "model." if model is tuned else ""
    out = {}
    for key in tensors:
        if key in bare:
            out[key] = tensors[key]
            continue
        found = None
        for candidate in _model_keys(tuned, key, adapter_name):
            if prefix + candidate in state_dict:
                found = state_dict[prefix + candidate]
                break
        if found is None:
            raise ConfigError(
                f"state_dict has no entry for adapter tensor {key!r} (looked for {prefix}{key} and its wrapped names)"
            )
        out[key] = found
    return out


def _model_keys(tuned, file_key: str, adapter_name: str) -> list[str]:
    """Names a file key may have in the wrapped model's state dict."""
    path, _, rest = file_key.rpartition(".")
    names = [file_key]
    while path:
        names.append(f"{path}.deltas.{adapter_name}.{rest}")
        names.append(f"{path}.modules_to_save.{adapter_name}.{rest}")
        path, _, head = path.rpartition(".")
        rest = f"{head}.{rest}"
    return names


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> IncompatibleKeys:
    """peft's `set_peft_model_state_dict`: copy tensors keyed as get_peft_model_state_dict gives them into
    an adapter. Loading is strict (exact keys and shapes, base tensors only when equal), so the
    returned missing/unexpected lists are always empty; a mismatch raises AdapterLoadError instead."""
    refuse_value(
        "set_peft_model_state_dict", "ignore_mismatched_sizes", ignore_mismatched_sizes, False,
        "tensors of another shape belong to another base model or rank, and loading is strict",
    )  # fmt: skip
    tuned = _tuned_of(model)
    if adapter_name not in tuned.adapters:
        raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {sorted(tuned.adapters)}")
    tensors = {(k[len(KEY_PREFIX) :] if k.startswith(KEY_PREFIX) else k): v for k, v in peft_model_state_dict.items()}
    tuned.load_adapter_state_dict(adapter_name, tensors, source="state dict")
    return IncompatibleKeys(missing_keys=[], unexpected_keys=[])


def _infixes(model: nn.Module) -> list[tuple[str, str]]:
    """(wrapped prefix, original prefix) per wrapper, longest first."""
    pairs = [(f"{p}.base_layer.", f"{p}.") for p, _ in inject.delta_wrappers(model)]
    pairs += [(f"{p}.original_module.", f"{p}.") for p, _ in inject.save_wrappers(model)]
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def _unwrapped_keys(tuned: TunedModel) -> dict[str, str]:
    """{original key: key in the wrapped model} for every base tensor (adapter tensors left out)."""
    from deltatune.core.tuned_model import _adapter_of

    infixes = _infixes(tuned.model)
    out: dict[str, str] = {}
    for key in tuned.model.state_dict():
        if _adapter_of(key) is not None:
            continue
        original = key
        for wrapped, plain in infixes:
            if original.startswith(wrapped):
                original = plain + original[len(wrapped) :]
        out[original] = key
    return out


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft's `get_base_model_state_dict`: the base model's tensors under their original keys (no
    "base_layer" / "original_module" infix, no adapter tensors). Merged adapters are in these values."""
    tuned = _tuned_of(model)
    state = tuned.model.state_dict()
    return {original: state[wrapped] for original, wrapped in _unwrapped_keys(tuned).items()}


def set_base_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> IncompatibleKeys:
    """peft's `set_base_model_state_dict`: load base tensors given under their original keys; with
    `strict`, missing or unexpected keys raise RuntimeError (as torch's load_state_dict does)."""
    tuned = _tuned_of(model)
    mapping = _unwrapped_keys(tuned)
    unexpected = [k for k in state_dict if k not in mapping]
    missing = [k for k in mapping if k not in state_dict]
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"Error(s) in loading state_dict: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}"
        )
    tuned.model.load_state_dict({mapping[k]: v for k, v in state_dict.items() if k in mapping}, strict=False)
    return IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)


# -- save_embedding_layers ------------------------------------------------------------------------------
def embedding_tensors(
    tuned: TunedModel, adapter_name: str, save_embedding_layers: bool | str
) -> dict[str, torch.Tensor]:
    """Base tensors of the input/output embeddings to save with the adapter (peft's `save_embedding_layers`).

    "auto": saved when an embedding is among target_modules (by peft's names embed_tokens / lm_head) or the
    vocabulary differs from the base model's config.json (when base_model_name_or_path is a local folder).
    When an embedding is targeted only the targeted ones are saved, else both input and output
    embeddings. Keys are the wrapped model's ("...embed_tokens.base_layer.weight" when targeted), as
    peft writes them."""
    if save_embedding_layers not in (True, False, "auto"):
        raise ConfigError(f"save_embedding_layers must be True, False or 'auto', got {save_embedding_layers!r}")
    if save_embedding_layers is False:
        return {}
    config = tuned.adapters[adapter_name].config
    if save_embedding_layers == "auto" and config.peft_type == "TRAINABLE_TOKENS":
        return {}  # as peft: the trained rows are the adapter, the table is not saved
    targets = config.target_modules
    targeted = isinstance(targets, list) and any(name in targets for name in EMBEDDING_LAYER_NAMES)
    if save_embedding_layers == "auto":
        if targeted:
            warnings.warn(
                "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.", stacklevel=3
            )
        elif _vocab_resized(tuned.model, config.base_model_name_or_path):
            warnings.warn(
                "Setting `save_embedding_layers` to `True` as the embedding layer has been resized during finetuning.",
                stacklevel=3,
            )
        else:
            return {}
    get_in = getattr(tuned.model, "get_input_embeddings", None)
    get_out = getattr(tuned.model, "get_output_embeddings", None)
    if not callable(get_in):
        warnings.warn(
            "Could not identify embedding layer(s) because the model is not a 🤗 transformers model.", stacklevel=3
        )
        return {}
    wanted = [m for m in (get_in(), get_out() if callable(get_out) else None) if m is not None]
    wanted = [m.base_layer if isinstance(m, DeltaWrapper) else m for m in wanted]
    out: dict[str, torch.Tensor] = {}
    for path, module in tuned.model.named_modules():
        inner = getattr(module, "base_layer", None) if isinstance(module, DeltaWrapper) else None
        # as peft: when an embedding is targeted, only targeted (wrapped) embeddings are saved; else both
        if any((module is w and not targeted) or inner is w for w in wanted):
            holder = f"{path}.base_layer" if inner is not None else path
            source = inner if inner is not None else module
            for name, tensor in source.state_dict().items():
                out[f"{holder}.{name}"] = tensor
    return out


def _vocab_resized(model: nn.Module, base_path: str | None) -> bool:
    import json
    from pathlib import Path

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab or not base_path or not (Path(base_path) / "config.json").is_file():
        return False
    try:
        saved = json.loads((Path(base_path) / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError):
        return False
    return saved is not None and saved != vocab


# -- merging into a tied tensor ---------------------------------------------------------------------------
def untie_before_merge(model: nn.Module, wrappers: list[DeltaWrapper], names: list[str]) -> list[str]:
    """Give each layer about to merge its own copy of a weight it shares with another module (a tied
    embedding / LM head), so merging changes that layer only; merged and unmerged outputs then agree.
    Sets `tie_word_embeddings=False` in the model's config so saving and reloading keeps them apart.
    Returns the names of the untied parameters' holders (for the log)."""
    holders: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                holders.setdefault(id(param), []).append(module)
    untied: list[str] = []
    for wrapper in wrappers:
        if not wrapper._pending(names):
            continue
        base = wrapper.base_layer
        weight = base._parameters.get("weight")
        if weight is None or len(holders.get(id(weight), [])) < 2:
            continue
        holders[id(weight)] = [m for m in holders[id(weight)] if m is not base]
        base.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        untied.append(type(base).__name__)
    if untied:
        config = getattr(model, "config", None)
        for cfg in {id(c): c for c in (config, _text_config(config)) if c is not None}.values():
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
        warnings.warn(
            "merging into a weight tied to another module (e.g. embeddings tied to the LM head): the merged layer now "
            "has its own copy and tie_word_embeddings=False was set in the model config",
            stacklevel=3,
        )
    return untied


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    try:
        return get() if callable(get) else None
    except Exception:  # noqa: BLE001 - some configs refuse get_text_config
        return None

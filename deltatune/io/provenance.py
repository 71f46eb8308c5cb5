"""Where an adapter came from, recorded in its sidecar and checked when it is loaded.

    base_fingerprint       a digest of the base model's architecture config and 16 sampled values of
                           its input and output embeddings (cheap: no full-weight hash); a load onto
                           a base whose samples differ warns, since the adapter then computes
                           something training never saw
    chat_template_sha256   the template the adapter was trained with; `deltatune infer`/`eval` warn
                           when the tokenizer's differs
    sha256                 {file name: sha256} of the weights file; verified on every load, so a
                           flipped bit is an error instead of a silently different adapter

An adapter whose LoRA B matrices are all zero (or IA3 vectors all one) does not change the model:
loading one warns that it is untrained. All checks are skipped for files that lack the fields
(adapters saved by peft or by older versions).
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import torch
from torch import nn

PROBE_VALUES = 16
"""Values sampled (evenly spaced) from each fingerprinted tensor."""
# (no layer count: structural tuners such as LLaMA-Pro add layers to the model they save from)
_CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "n_embd", "d_model")  # fmt: skip
SIDECAR_KEYS = ("base_fingerprint", "chat_template_sha256", "sha256")


def template_sha256(template: str | None) -> str | None:
    return hashlib.sha256(template.encode()).hexdigest() if template else None


def _weight(module: Any) -> torch.Tensor | None:
    base = getattr(module, "base_layer", None) or getattr(module, "original_module", None) or module
    weight = getattr(base, "weight", None)
    sharded = hasattr(weight, "device_mesh")  # an FSDP2 shard: the trainer fingerprints the base before sharding
    usable = isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.numel()
    if usable and not (weight.is_meta or sharded):
        return weight
    return None


def _probed(model: nn.Module) -> dict[str, torch.Tensor]:
    found = {}
    for label, getter in (("input_embeddings", "get_input_embeddings"), ("output_embeddings", "get_output_embeddings")):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError, TypeError):
            continue
        weight = _weight(module) if module is not None else None
        if weight is not None:
            found[label] = weight
    return found


def _sample(tensor: torch.Tensor) -> list[float]:
    flat = tensor.detach().reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, PROBE_VALUES, dtype=torch.float64).round().long().to(flat.device)  # fp32 rounds n-1 up past 2**24
    return [round(float(v), 6) for v in flat[index].float().cpu()]


def base_fingerprint(model: nn.Module) -> dict[str, Any] | None:
    """The fingerprint of a base model (None when it has no embeddings to sample)."""
    probed = _probed(model)
    if not probed:
        return None
    config = getattr(model, "config", None)
    arch = {k: getattr(config, k) for k in _CONFIG_KEYS if config is not None and hasattr(config, k)}
    return {
        "config_sha256": hashlib.sha256(repr(sorted(arch.items())).encode()).hexdigest(),
        "tensors": {label: {"shape": list(t.shape), "values": _sample(t)} for label, t in probed.items()},
    }


def base_mismatch(saved: Any, model: nn.Module) -> str | None:
    """Why `model` is not the base the fingerprint `saved` was taken from, or None."""
    if not isinstance(saved, dict):
        return None
    now = base_fingerprint(model)
    if now is None:
        return None
    if saved.get("config_sha256") and saved["config_sha256"] != now["config_sha256"]:
        return "its architecture config differs"
    for label, entry in (saved.get("tensors") or {}).items():
        mine = now["tensors"].get(label)
        if mine is None or not isinstance(entry, dict) or list(entry.get("shape", [])) != mine["shape"]:
            continue
        expected, actual = torch.tensor(entry["values"]), torch.tensor(mine["values"])
        if expected.shape == actual.shape and not torch.allclose(actual, expected, rtol=1e-2, atol=1e-4):
            return f"its {label.replace('_', ' ')} hold other values"
    return None


def warn_if_other_base(saved: Any, model: nn.Module, source: str) -> None:
    why = base_mismatch(saved, model)
    if why:
        warnings.warn(
            f"{source} was trained on another base model ({why}); on this one it computes something training "
            "never saw. Load it onto the base it was trained on",
            stacklevel=3,
        )


def warn_if_template_differs(saved: str | None, template: str | None, source: str) -> None:
    if saved and template and saved != template_sha256(template):
        warnings.warn(
            f"{source} was trained with another chat template than this tokenizer's; answers may be off. "
            "Use the tokenizer the adapter was trained with",
            stacklevel=3,
        )


def warn_if_untrained(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Warn when every LoRA B tensor is zero (or every IA3 vector is one): the adapter changes nothing."""
    b = [t for k, t in tensors.items() if "lora_B" in k or "lora_embedding_B" in k]
    ia3 = [t for k, t in tensors.items() if "ia3_l" in k]
    untrained = (b and all(not bool(t.any()) for t in b)) or (ia3 and all(bool((t == 1).all()) for t in ia3))
    if untrained:
        warnings.warn(
            f"{source} is untrained: all its {'B matrices are zero' if b else 'vectors are one'}, so it does not "
            "change the model's outputs. Check that training ran and saved the adapter you meant",
            stacklevel=3,
        )

"""QLoRA: train adapters on a base model whose linear layers are stored in 4 or 8 bits.

Dettmers et al. 2023, https://arxiv.org/abs/2305.14314. The frozen base weights are kept in
bitsandbytes' NF4 (4-bit NormalFloat, optionally with double-quantized absmax) or LLM.int8
storage and dequantized on the fly inside each matmul; the LoRA matrices stay fp32 and are the
only thing that trains. Nothing here is QLoRA-specific in the engine: deltatune's weight
backends (deltatune/backends/bnb.py) tell tuners the dense weight of a quantized layer, and
merging into quantized storage is refused unless asked to dequantize
(`TunedModel.merge_and_unload(dequantize=True)`).

    quant = dt.quantization.bnb_config(bits=4)                      # NF4 + double quant
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant)
    base = dt.prepare_for_kbit_training(base)                       # fp32 norms/head, checkpointing
    model = dt.get_tuned_model(base, dt.LoraConfig(r=16, target_modules="all-linear"))
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from deltatune import backends
from deltatune.backends.bnb import COMPUTE_DTYPES_4BIT, INSTALL_HINT, check_compute_dtype
from deltatune.core.config import ConfigError

_HALF = (torch.float16, torch.bfloat16)


def require_bitsandbytes() -> Any:
    """Import bitsandbytes, or raise ImportError with the install command."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as err:
        raise ImportError(
            f"4-bit / 8-bit base models (QLoRA) need the bitsandbytes package, which is not installed: {INSTALL_HINT}"
        ) from err


def bnb_config(
    bits: int = 4,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    skip_modules: list[str] | None = None,
) -> Any:
    """A validated `transformers.BitsAndBytesConfig` for `from_pretrained(..., quantization_config=...)`.

    Args:
        bits: 4 (QLoRA) or 8 (LLM.int8).
        quant_type: "nf4" (QLoRA's NormalFloat) or "fp4"; 4-bit only.
        double_quant: also quantize the per-block absmax values (about 0.4 bit per weight saved).
        compute_dtype: dtype the 4-bit matmuls run in: float32, bfloat16 or float16.
        skip_modules: module names left dense (transformers keeps the output head dense anyway).

    Raises:
        ImportError: bitsandbytes is missing (with the install command).
        ConfigError: a value bitsandbytes cannot use, before any weights load.
    """
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if bits not in (4, 8):
        raise ConfigError(f"bits must be 4 or 8, got {bits!r}")
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    check_compute_dtype(compute_dtype, "bnb_config")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip_modules,
    )


def check_quantized_model(model: nn.Module) -> list[str]:
    """Paths of the model's quantized layers; raises ConfigError for one deltatune cannot use
    (a 4-bit compute dtype the kernels get wrong, a bitsandbytes layer type with no backend)."""
    found = []
    for name, module in model.named_modules():
        info = backends.describe(module)  # raises for a bad 4-bit compute dtype
        if info is None or not info.quantized:
            continue
        if info.kind == "unsupported-quantized":
            raise ConfigError(
                f"{name!r} is a bitsandbytes {type(module).__name__}, which deltatune cannot tune or dequantize; "
                "keep it dense when loading (BitsAndBytesConfig(llm_int8_skip_modules=[...]))"
            )
        found.append(name)
    return found


def prepare_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Make a 4-bit / 8-bit base ready for adapter training (call before `get_tuned_model`).

    - Checks every quantized layer (see `check_quantized_model`), so a bad setup fails here, not
      hours into training, and keeps each one differentiable (`backends.prepare_for_training`).
    - Freezes every base parameter.
    - Casts fp16/bf16 normalisation layers and the dense (non-quantized) linear layers, the output
      head among them, to fp32: their small reductions and the logits are where half precision
      hurts. Embeddings keep their dtype. (A large untied head costs memory in fp32: see
      docs/benchmarks.md, "QLoRA memory".)
    - With `use_gradient_checkpointing`, turns on activation checkpointing and makes the input
      embeddings' output require grad, so the adapters inside checkpointed blocks get gradients
      even with reentrant checkpointing (whose blocks see no input that requires grad otherwise).

    Also accepts a TunedModel (its adapters keep training). Returns the same model.
    """
    from deltatune.core.tuned_model import TunedModel

    tuned = model if isinstance(model, TunedModel) else None
    base = tuned.get_base_model() if tuned is not None else model
    check_quantized_model(base)
    backends.prepare_for_training(base)
    for param in base.parameters():
        param.requires_grad_(False)
    for module in base.modules():
        info = backends.describe(module) if isinstance(module, nn.Linear) else None
        is_dense_linear = info is not None and not info.quantized and type(module) is nn.Linear
        if is_dense_linear or "norm" in type(module).__name__.lower():
            for param in module.parameters(recurse=False):
                if param.dtype in _HALF:
                    param.data = param.data.float()
    if use_gradient_checkpointing:
        _enable_checkpointing(base, gradient_checkpointing_kwargs)
        _inputs_require_grad(base)
    if tuned is not None:
        tuned._refresh()  # the adapters' parameters train again
    return model


prepare_model_for_kbit_training = prepare_for_kbit_training
"""peft's name for the same function."""


def _enable_checkpointing(model: nn.Module, kwargs: dict[str, Any] | None) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):  # transformers >= 5.x
        enable(activation_checkpointing_kwargs=kwargs)
        return
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(enable):
        raise ConfigError(
            f"{type(model).__name__} has no gradient checkpointing (gradient_checkpointing_enable); "
            "pass use_gradient_checkpointing=False"
        )
    enable(gradient_checkpointing_kwargs=kwargs)


def _inputs_require_grad(model: nn.Module) -> None:
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        enable()
        return
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if embeddings is None:
        raise ConfigError(f"{type(model).__name__} exposes no input embeddings (get_input_embeddings) to hook")
    embeddings.register_forward_hook(lambda _module, _inputs, output: output.requires_grad_(True))


__all__ = [
    "COMPUTE_DTYPES_4BIT",
    "bnb_config",
    "check_quantized_model",
    "prepare_for_kbit_training",
    "prepare_model_for_kbit_training",
    "require_bitsandbytes",
]

"""`model(input_ids, labels=...)` on a causal LM without the full-vocabulary logits.

The standard forward of a transformers causal LM is backbone -> head -> `ForCausalLMLoss`: logits
(B, T, V), upcast to fp32, shifted by one, mean cross-entropy over labels != -100 (or the sum over
`num_items_in_batch`). With a frozen head that loss equals what `fused_linear_cross_entropy`
computes from the backbone's last hidden state in chunks, keeping only dL/dh (B*T, H) for
backward instead of (B, T, V) logits and their softmax. `fused_causal_lm_forward` runs that
equivalent computation when it can prove the equivalence from the model's structure, and returns
None (caller runs the standard forward) when it cannot.

Under autocast the head's matmul runs in the autocast dtype, as the standard forward's does (the
softmax in fp32 in both). What the caller gets back: a `CausalLMOutputWithPast` with the same
`loss` (within float tolerance, gradients too) and the backbone's cache / hidden states / attentions, and
`logits=None`: the logits were never built. Code that needs logits in training turns this off
(`get_tuned_model(..., fused_loss=False)` or `tuned.fused_loss = False`), or calls without labels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from deltatune.ops.fused_ce import IGNORE_INDEX, _plain_head, fused_linear_cross_entropy

# Keys the standard forward hands to its loss function only; the backbone never needs them.
_LOSS_KEYS = ("labels", "num_items_in_batch", "shift_labels", "ignore_index")
# Logit transforms some causal LMs apply after the head (the fused loss would not reproduce them).
_LOGIT_TRANSFORMS = ("output_multiplier", "lm_head_multiplier")


def why_not_fused(model: nn.Module, kwargs: dict[str, Any]) -> str | None:
    """Why `model(**kwargs)` cannot take the fused loss path (None when it can).

    `model` is the transformers model itself (inside a TunedModel: `tuned.get_base_model()`), and
    `kwargs` the keyword arguments its forward would get (after any input adapter's rewrite)."""
    labels = kwargs.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        return "no 2-D token labels"
    keep = kwargs.get("logits_to_keep")
    if kwargs.get("return_dict") is False or not (keep is None or (isinstance(keep, int) and keep == 0)):
        return "return_dict=False or logits_to_keep asks for the standard outputs"
    if kwargs.get("ignore_index", IGNORE_INDEX) != IGNORE_INDEX:
        return "a custom ignore_index"
    if kwargs.get("output_router_logits"):
        return "a mixture-of-experts auxiliary loss was requested"
    config = getattr(model, "config", None)
    if config is None or getattr(config, "output_router_logits", False):
        return "no config, or a mixture-of-experts auxiliary loss"
    if getattr(config, "return_dict", True) is False and kwargs.get("return_dict") is not True:
        return "the config asks for tuple outputs (return_dict=False)"
    get_text_config = getattr(config, "get_text_config", None)
    if not callable(get_text_config) or get_text_config() is not config:
        return "a multimodal model (its language config is nested)"
    if type(model).__name__ not in _causal_lm_classes():
        return f"{type(model).__name__} is not a transformers causal LM class"
    if not _uses_causal_lm_loss(model):
        return "the model computes its loss with a function other than ForCausalLMLoss"
    head = _plain_head(model)
    if head is None or any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return "the output head trains, is not a plain nn.Linear, or its logits are scaled / soft-capped"
    if _is_sharded(head.weight):
        return "the head's weight is sharded (FSDP2 / tensor parallel)"
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        return "no separate backbone module"
    # The model holds exactly a backbone and the head (no transform between them, like BERT's LM
    # head, and no parameter of its own): its forward can only be head(backbone(...)).
    children = list(model.children())
    if len(children) != 2 or not any(c is backbone for c in children) or not any(c is head for c in children):
        return "the model holds more than a backbone and its output head"
    if next(model.parameters(recurse=False), None) is not None:
        return "the model has parameters outside its backbone and head"
    if _has_hooks(model) or _has_hooks(head) or hasattr(model, "_hf_hook"):
        return "hooks on the model or its head would be skipped"
    return None


def fused_causal_lm_forward(model: nn.Module, kwargs: dict[str, Any]) -> Any:
    """`model(**kwargs)` with the loss through the chunked fused path, or None when not provably equal.

    Same loss as the standard forward: position t predicts labels[t + 1] (the last position predicts
    nothing), or `shift_labels[t]` when given; labels of -100 are ignored; the mean over supervised
    tokens, or the sum divided by `num_items_in_batch` when given (what transformers.Trainer passes
    under gradient accumulation)."""
    if why_not_fused(model, kwargs) is not None:
        return None
    from transformers.modeling_outputs import CausalLMOutputWithPast

    call = {k: v for k, v in kwargs.items() if k not in _LOSS_KEYS and k not in ("return_dict", "logits_to_keep")}
    labels, shift_labels = kwargs["labels"], kwargs.get("shift_labels")
    outputs = model.base_model(**call)
    hidden = outputs.last_hidden_state  # (B, T, H)
    if shift_labels is not None:  # already aligned with the positions (context parallelism)
        targets = shift_labels.reshape(-1)
    else:  # position t predicts token t + 1; the last position predicts nothing
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)  # (B*T,)
    if targets.numel() != hidden.shape[0] * hidden.shape[1]:
        raise ValueError(
            f"labels cover {targets.numel()} positions but the model produced {hidden.shape[0] * hidden.shape[1]}; "
            "give labels of the same shape as input_ids"
        )
    head = model.get_output_embeddings()
    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} - {"loss", "logits"}
    extra = {name: value for name, value in outputs.items() if name in names}
    weight, bias = head.weight, head.bias
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # the standard head runs in the autocast dtype: so do we
        dtype = torch.get_autocast_dtype(device)
        hidden, weight, bias = hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    elif hidden.dtype != weight.dtype:  # the rest of the model's own forward, as it would run it
        logits = head(hidden)
        loss_kwargs = {k: kwargs[k] for k in _LOSS_KEYS[1:] if k in kwargs}
        loss = model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size, **loss_kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **extra)
    targets = targets.to(hidden.device)
    total = fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets)
    divisor = kwargs.get("num_items_in_batch")
    if divisor is None:
        divisor = (targets != IGNORE_INDEX).sum()
    elif isinstance(divisor, torch.Tensor):
        divisor = divisor.to(total.device)
    return CausalLMOutputWithPast(loss=total / divisor, logits=None, **extra)


def _uses_causal_lm_loss(model: nn.Module) -> bool:
    """What `PreTrainedModel.loss_function` resolves to (read without its warning for an unset loss_type)."""
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    if getattr(type(model), "loss_function", None) is not PreTrainedModel.__dict__.get("loss_function"):
        return False  # the class defines its own
    if "_loss_function" in model.__dict__:  # set by the user
        return model.__dict__["_loss_function"] is ForCausalLMLoss
    loss_type = getattr(model, "loss_type", None)
    return LOSS_MAPPING.get(loss_type, ForCausalLMLoss) is ForCausalLMLoss


def _is_sharded(weight: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(weight, DTensor)


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or getattr(module, "_forward_hooks_with_kwargs", None)
    )


_CLASSES: set[str] = set()


def _causal_lm_classes() -> set[str]:
    """Class names transformers' AutoModelForCausalLM maps to (their forwards follow backbone -> head -> loss)."""
    if not _CLASSES:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            _CLASSES.update([names] if isinstance(names, str) else names)
    return _CLASSES

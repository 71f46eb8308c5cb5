"""What merging into a quantized base costs: the drift report of `merge_and_unload(dequantize=True)`.

Adapters trained on a 4-bit / 8-bit base (QLoRA) cannot be merged into that storage without
requantizing, which adds error silently. The explicit route dequantizes every quantized layer
to a dense nn.Linear, merges there, and measures how far the dense merged model's outputs are
from what the quantized model with the adapter computed, on one probe input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("deltatune")

PROBE_SHAPE = (2, 16)
"""Default probe: this many random token ids (seed 0) when the model has a `config.vocab_size`."""


@dataclass(frozen=True)
class DequantizeReport:
    """Result of `merge_and_unload(dequantize=True)`, kept as `TunedModel.merge_report`."""

    dequantized_layers: list[str]
    """Paths of the quantized layers replaced by dense nn.Linear layers."""
    dtype: torch.dtype
    """Dtype of the dense layers (the dtype of the model's other floating parameters)."""
    max_abs_logit_diff: float | None
    """max |dense merged - quantized unmerged| over the probe's outputs; None without a probe."""
    max_prob_diff: float | None
    """The same in probability space (softmax over the last dimension); None without a probe."""

    def summary(self) -> str:
        head = f"dequantized {len(self.dequantized_layers)} layer(s) to {str(self.dtype).removeprefix('torch.')}"
        if self.max_abs_logit_diff is None:
            return head + "; drift not measured (pass probe_inputs=... to measure it)"
        return (
            f"{head}; drift of the merged dense model on the probe: max |delta logits| = "
            f"{self.max_abs_logit_diff:.3g}, max |delta probability| = {self.max_prob_diff:.3g}"
        )


def dense_dtype(model: nn.Module) -> torch.dtype:
    """Dtype for dequantized layers: that of the first floating parameter not in a quantized layer
    (bitsandbytes keeps packed weights as integer tensors), else float32."""
    for param in model.parameters():
        if param.is_floating_point() and type(param).__name__ not in ("Params4bit", "Int8Params"):
            return param.dtype
    return torch.float32


def default_probe(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Seeded random token ids for a model with `config.vocab_size`, else None."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        return None
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    device = embeddings.weight.device if embeddings is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab, PROBE_SHAPE, generator=gen).to(device)}


def probe_outputs(model: nn.Module, probe: Any) -> torch.Tensor:
    """The model's output tensor (logits) on `probe` in eval mode without grad, as float32."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**probe) if isinstance(probe, dict) else model(probe)
    finally:
        model.train(was_training)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"cannot find an output tensor in {type(out).__name__}; pass a probe the model returns logits for"
        )
    return out.detach().float()


def measure_drift(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float]:
    """(max |after - before|, max |softmax(after) - softmax(before)|) over the last dimension."""
    logit = (after - before).abs().max().item()
    prob = (after.softmax(-1) - before.softmax(-1)).abs().max().item()
    return logit, prob


def forget_quantization(model: nn.Module) -> None:
    """Drop transformers' record that the model is quantized, so save_pretrained writes a dense model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)  # transformers' own cleanup
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)

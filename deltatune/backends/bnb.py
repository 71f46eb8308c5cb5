"""Weight backends for bitsandbytes' quantized linear layers (QLoRA bases).

- `Linear4bit` (NF4 / FP4, optionally double-quantized absmax): the weight is a packed uint8
  `Params4bit` plus a `QuantState`; `read_weight` dequantizes it to a dense (out, in) tensor,
  `write_weight` quantizes a dense tensor again with the layer's own settings (lossy).
- `Linear8bitLt` (LLM.int8): int8 rows `CB` with one absmax per row `SCB`; W = CB * SCB / 127.

Tuners never see the packed storage: the LoRA delta calls the quantized layer unchanged, DoRA
reads the dequantized weight. bitsandbytes itself is never imported here: a bitsandbytes layer
can only exist once the package is imported, so `matches` looks it up in `sys.modules`.

Any other bitsandbytes layer holding quantized storage (Embedding4bit, ...) gets kind
"unsupported-quantized", so targeting it is a clear error rather than a read of packed bytes.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError

COMPUTE_DTYPES_4BIT = (torch.float32, torch.float16, torch.bfloat16)
"""Dtypes bitsandbytes' 4-bit kernels compute in (its CPU and CUDA kernels both take these)."""

INSTALL_HINT = "pip install 'deltatune[qlora]'  (or: pip install 'bitsandbytes>=0.45')"


def _bnb() -> Any | None:
    """The bitsandbytes module if something already imported it, else None (never imports it)."""
    return sys.modules.get("bitsandbytes")


def check_compute_dtype(dtype: Any, where: str) -> None:
    """Raise ConfigError unless `dtype` is None or one the 4-bit kernels compute in."""
    if dtype is not None and dtype not in COMPUTE_DTYPES_4BIT:
        names = ", ".join(str(d).removeprefix("torch.") for d in COMPUTE_DTYPES_4BIT)
        raise ConfigError(
            f"{where}: 4-bit compute dtype {dtype} is not supported by bitsandbytes' 4-bit kernels; "
            f"use one of {names} (bnb_4bit_compute_dtype=torch.bfloat16 on recent hardware, float32 on CPU)"
        )


class Linear4bitBackend:
    """bitsandbytes.nn.Linear4bit (and its LinearNF4 / LinearFP4 subclasses)."""

    def matches(self, layer: nn.Module) -> bool:
        bnb = _bnb()
        return bnb is not None and isinstance(layer, bnb.nn.Linear4bit)

    def info(self, layer: nn.Module) -> LayerInfo:
        check_compute_dtype(getattr(layer, "compute_dtype", None), type(layer).__name__)
        return LayerInfo("linear", layer.in_features, layer.out_features, quantized="4bit")

    def read_weight(self, layer: nn.Module) -> torch.Tensor:
        import bitsandbytes.functional as bnb_f

        weight = layer.weight
        state = weight.quant_state if weight.quant_state is not None else layer.quant_state
        data = weight.data
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks CPU weights in place for its AVX512-BF16 inference kernel; undo
            # that on copies so the layer keeps running as it is.
            data, state = bnb_f._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        dense = bnb_f.dequantize_4bit(data, state)  # (out, in)
        assert dense.shape == (layer.out_features, layer.in_features), dense.shape
        return dense

    def prepare_for_training(self, layer: nn.Module) -> None:
        """Keep the layer differentiable. On CPUs with AVX512-BF16, bitsandbytes repacks the weight in
        place on the first eval forward without grad, and its kernel for that layout has no backward:
        training afterwards silently loses every gradient through the layer. Undo the repacking (as
        bitsandbytes' own state_dict does) and turn it off for this layer."""
        import bitsandbytes.functional as bnb_f

        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
        weight = layer.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = bnb_f._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )

    def write_weight(self, layer: nn.Module, weight: torch.Tensor) -> None:
        """Quantize `weight` (out, in) again with the layer's settings; adds quantization error."""
        import bitsandbytes as bnb

        old = layer.weight
        if tuple(weight.shape) != (layer.out_features, layer.in_features):
            raise ValueError(
                f"weight shape {tuple(weight.shape)} does not fit ({layer.out_features}, {layer.in_features})"
            )
        state = old.quant_state if old.quant_state is not None else layer.quant_state
        dtype = getattr(state, "original_dtype", None) or state.dtype
        new = bnb.nn.Params4bit(
            weight.detach().to("cpu", dtype).contiguous(),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=layer,
        )
        layer.weight = new.to(old.device)  # moving it quantizes (also on the CPU)


class Linear8bitLtBackend:
    """bitsandbytes.nn.Linear8bitLt (LLM.int8): W = CB * SCB / 127, one absmax per output row."""

    def matches(self, layer: nn.Module) -> bool:
        bnb = _bnb()
        return bnb is not None and isinstance(layer, bnb.nn.Linear8bitLt)

    def info(self, layer: nn.Module) -> LayerInfo:
        return LayerInfo("linear", layer.in_features, layer.out_features, quantized="8bit")

    def read_weight(self, layer: nn.Module) -> torch.Tensor:
        weight = layer.weight
        if weight.dtype != torch.int8:  # has_fp16_weights=True: a dense weight that trains
            return weight.detach()
        # The first forward moves the row scales from the parameter into the layer's state.
        scales = layer.state.SCB if layer.state.SCB is not None else weight.SCB
        if scales is None:
            raise RuntimeError(f"{type(layer).__name__} has int8 weights but no row scales (SCB)")
        return weight.data.float() * (scales.float().view(-1, 1) / 127.0)  # (out, in)

    def write_weight(self, layer: nn.Module, weight: torch.Tensor) -> None:
        """Quantize `weight` (out, in) to int8 rows again; adds quantization error."""
        import bitsandbytes as bnb

        old = layer.weight
        if tuple(weight.shape) != tuple(old.shape):
            raise ValueError(f"weight shape {tuple(weight.shape)} does not fit {tuple(old.shape)}")
        new = bnb.nn.Int8Params(
            weight.detach().to("cpu", torch.float16).contiguous(),
            requires_grad=False,
            has_fp16_weights=old.has_fp16_weights,
        )
        layer.weight = new.to(old.device)  # moving it quantizes (also on the CPU)
        layer.state.CB = layer.state.SCB = None  # the next forward takes the new CB / SCB


class UnsupportedBnbBackend:
    """Any other bitsandbytes layer with quantized storage: known, but not targetable."""

    def matches(self, layer: nn.Module) -> bool:
        bnb = _bnb()
        if bnb is None or not type(layer).__module__.startswith("bitsandbytes"):
            return False
        weight = getattr(layer, "weight", None)
        return isinstance(weight, (bnb.nn.Params4bit, bnb.nn.Int8Params))

    def info(self, layer: nn.Module) -> LayerInfo:
        quantized = "4bit" if type(layer.weight).__name__ == "Params4bit" else "8bit"
        return LayerInfo("unsupported-quantized", 0, 0, quantized=quantized)

    def read_weight(self, layer: nn.Module) -> torch.Tensor:
        raise TypeError(f"deltatune cannot read the quantized weight of bitsandbytes {type(layer).__name__}")

    def write_weight(self, layer: nn.Module, weight: torch.Tensor) -> None:
        raise TypeError(f"deltatune cannot write the quantized weight of bitsandbytes {type(layer).__name__}")


# Most specific first: they are inserted in turn at the front of deltatune.backends.BACKENDS.
BNB_BACKENDS = (UnsupportedBnbBackend(), Linear8bitLtBackend(), Linear4bitBackend())

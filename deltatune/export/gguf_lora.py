"""A LoRA adapter alone, in llama.cpp's LoRA GGUF layout (`llama-cli -m base.gguf --lora adapter.gguf`).

The layout llama.cpp's convert_lora_to_gguf.py writes and llama-adapter.cpp reads:

    general.type = "adapter", adapter.type = "lora", adapter.lora.alpha = alpha (float32),
    general.architecture = the base model's llama.cpp architecture
    <base tensor name>.lora_a   torch shape (r, in)   -> GGUF ne = [in, r]
    <base tensor name>.lora_b   torch shape (out, r)  -> GGUF ne = [r, out]

llama.cpp computes W x + (alpha / r) * B (A x), with r read from the tensor. Where our scale is
not alpha / r (rsLoRA's alpha / sqrt(r), rank_pattern / alpha_pattern), the difference is folded
into B, so every layer computes exactly the update it trained with. For the Llama family the rows of
q/k LoRA B are reordered like the base q/k weights (llama.cpp's rotary pairing; gguf_arch.py).

Only plain LoRA on linear layers fits this format: DoRA (a per-row magnitude), LoRA on embeddings,
trained biases, PiSSA/OLoRA (which rewrite the base weights) and modules_to_save are refused with
the alternative (`--to gguf` merges any of them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from deltatune.export import gguf_arch
from deltatune.export.gguf_arch import ExportError

_LORA_TYPES = ("f32", "f16", "bf16", "q8_0")


def lora_factors(tuned: Any, adapter_name: str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (A (r, in), B (out, r), scale)} of a TunedModel's LoRA adapter.

    Raises:
        ExportError: the adapter is not plain LoRA on linear layers.
    """
    from deltatune.core import inject

    name = adapter_name or tuned.active_adapters[0]
    adapter = tuned.adapters[name]
    hint = "; export the merged model instead (--to gguf)"
    if adapter.spec.name != "lora":
        raise ExportError(f"--to gguf-lora needs a LoRA adapter, this one is {adapter.spec.name!r}{hint}")
    if adapter.saved_modules or adapter.extra_params:
        extra = adapter.saved_modules or adapter.extra_params
        raise ExportError(f"llama.cpp LoRA files hold only low-rank pairs; this adapter also trains {extra[:3]}{hint}")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for path, wrapper in inject.delta_wrappers(tuned.model):
        delta = wrapper.deltas[name] if name in wrapper.deltas else None
        if delta is None:
            continue
        if type(delta).__name__ != "LoraLinear":
            raise ExportError(
                f"llama.cpp LoRA files hold LoRA on linear layers only; {path!r} is a {type(delta).__name__}{hint}"
            )
        if delta.use_dora:
            raise ExportError(f"DoRA has a per-row magnitude that llama.cpp LoRA files cannot hold ({path!r}){hint}")
        if delta.init in ("pissa", "olora") or str(delta.init).startswith("pissa"):
            raise ExportError(f"{delta.init} rewrote the base weights, so the adapter needs that base ({path!r}){hint}")
        a = delta.lora_A.weight.detach().float().cpu()  # (r, in)
        b = delta.lora_B.weight.detach().float().cpu()  # (out, r)
        factors[path] = (a, b, float(delta.scale))
    if not factors:
        raise ExportError(f"adapter {name!r} has no LoRA layers to export")
    return factors


def write_lora_gguf(
    tuned: Any,
    path: str | os.PathLike,
    *,
    gguf_type: str = "f32",
    adapter_name: str | None = None,
    name: str | None = None,
) -> Path:
    """Write a TunedModel's LoRA adapter as a llama.cpp LoRA GGUF; returns the file.

    Raises:
        ExportError: see lora_factors; an unsupported base architecture or type.
    """
    import gguf

    gguf_arch.require_gguf()
    if gguf_type not in _LORA_TYPES:
        raise ExportError(f"--gguf-type for a LoRA GGUF must be one of {', '.join(_LORA_TYPES)}, got {gguf_type!r}")
    config = tuned.model.config
    arch = gguf_arch.arch_for(config)
    factors = lora_factors(tuned, adapter_name)
    alpha = float(tuned.adapters[adapter_name or tuned.active_adapters[0]].config.lora_alpha)
    if alpha <= 0:  # llama.cpp reads alpha 0 as "no scaling"; our scale would not survive the fold
        raise ExportError(f"lora_alpha is {alpha}; a llama.cpp LoRA file needs lora_alpha > 0 (use --to gguf)")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch.gguf_arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name or "deltatune LoRA")
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for path_, (a, b, scale) in factors.items():
            base_name = gguf_arch.tensor_name(arch, int(config.num_hidden_layers), path_ + ".weight")
            if base_name == "output.weight" and getattr(config, "tie_word_embeddings", False):
                raise ExportError(
                    f"{path_!r} is tied to the input embeddings, and a GGUF of this base has no output.weight "
                    "for a LoRA to attach to; use --to gguf"
                )
            if base_name is None:
                raise ExportError(f"{path_!r} has no llama.cpp tensor name for architecture {arch.gguf_arch!r}")
            rank = a.shape[0]
            b = b * (scale * rank / alpha)  # llama.cpp applies alpha / r; fold in whatever differs
            heads = gguf_arch.permute_heads(arch, config, path_ + ".weight")
            if heads is not None:
                b = gguf_arch.llama_permute(b, heads)  # rows of B are output rows, like the base weight's
            for suffix, tensor in ((".lora_a", a), (".lora_b", b)):
                data, kind = gguf_arch.encode(tensor.numpy(), gguf_type)
                writer.add_tensor(base_name + suffix, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out

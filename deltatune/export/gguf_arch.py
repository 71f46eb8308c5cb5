"""What llama.cpp calls things: architectures, tensor names, the q/k row order, tensor encodings.

A transformers checkpoint and a llama.cpp GGUF hold the same numbers under different names and,
for the Llama family, a different row order in the query/key projections: llama.cpp's rotary
embedding pairs dimensions (2i, 2i+1) within each head, transformers' pairs (i, i + d/2). llama.cpp's
converter (convert_hf_to_gguf.py, `LlamaModel.permute`) reorders the rows of q_proj / k_proj once at
conversion; transformers' GGUF loader undoes it. Qwen2/Qwen3 use the (i, i + d/2) pairing in both,
so their rows stay as they are.

Names come from the `gguf` package's own table (`gguf.get_tensor_name_map`), the one llama.cpp's
converter uses, so `model.layers.3.self_attn.q_proj.weight` becomes `blk.3.attn_q.weight`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deltatune.core.config import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch


class ExportError(ConfigError):
    """An export cannot be written as asked (unsupported architecture, tuner or type); the message says why."""


@dataclass(frozen=True)
class Arch:
    """How one transformers `model_type` is written for llama.cpp."""

    gguf_arch: str
    """llama.cpp's architecture name (general.architecture)."""
    permute_qk: bool
    """Reorder q/k rows into llama.cpp's rotary pairing (Llama family)."""
    rope_dimension_key: bool
    """Write `<arch>.rope.dimension_count` (llama.cpp's Llama loader reads the head size from it)."""


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", permute_qk=True, rope_dimension_key=True),  # Llama 1/2/3, SmolLM/SmolLM2
    "mistral": Arch("llama", permute_qk=True, rope_dimension_key=True),  # llama.cpp runs Mistral as llama
    "qwen2": Arch("qwen2", permute_qk=False, rope_dimension_key=False),
    "qwen3": Arch("qwen3", permute_qk=False, rope_dimension_key=False),
}

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
"""Tensor encodings `--gguf-type` accepts. 1-D tensors (norms, biases) always stay f32, as llama.cpp writes them."""


def arch_for(config: Any) -> Arch:
    """The Arch for a transformers config.

    Raises:
        ExportError: the model type is not one llama.cpp names the same way we write it.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ExportError(
            f"GGUF export does not support model type {model_type!r}; supported: {', '.join(sorted(ARCHS))}. "
            "Export a merged transformers folder (--merge) and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = _rope_type(config)
    if rope not in (None, "default"):
        raise ExportError(
            f"GGUF export supports plain rotary embeddings only; this model uses rope scaling {rope!r}. "
            "Export a merged transformers folder (--merge) and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    return ARCHS[model_type]


def _rope_type(config: Any) -> str | None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict):
        return params.get("rope_type") or params.get("type")
    return None


def rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def tensor_name(arch: Arch, n_layers: int, hf_name: str) -> str | None:
    """llama.cpp's name for a transformers tensor name, or None when llama.cpp has no such tensor."""
    import gguf

    table = _name_maps.get((arch.gguf_arch, n_layers))
    if table is None:
        enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf_arch)
        table = _name_maps[(arch.gguf_arch, n_layers)] = gguf.get_tensor_name_map(enum, n_layers)
    return table.get_name(hf_name, try_suffixes=(".weight", ".bias"))


_name_maps: dict[tuple[str, int], Any] = {}


def llama_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection (or its bias, or a LoRA B) from transformers' rotary
    pairing to llama.cpp's, per head: row order (half, i) -> (i, half)."""
    shape = rows.shape
    d = shape[0] // n_head  # rows per head
    return rows.reshape(n_head, 2, d // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)  # (out, ...)


def permute_heads(arch: Arch, config: Any, hf_name: str) -> int | None:
    """How many heads to permute `hf_name` over (None: leave it)."""
    if not arch.permute_qk:
        return None
    if ".q_proj." in hf_name or hf_name.endswith(".q_proj"):
        return int(config.num_attention_heads)
    if ".k_proj." in hf_name or hf_name.endswith(".k_proj"):
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return None


def encode(array: np.ndarray, gguf_type: str) -> tuple[np.ndarray, Any]:
    """(data, GGMLQuantizationType) for one tensor; 1-D tensors stay f32 and q8_0 falls back to
    f16 when a row is not a multiple of the 32-value block (what llama.cpp's converter does)."""
    import gguf
    import numpy as np

    kinds = gguf.GGMLQuantizationType
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim <= 1 or gguf_type == "f32":
        return array, kinds.F32
    if gguf_type == "f16":
        return array.astype(np.float16), kinds.F16
    if gguf_type == "bf16":
        return gguf.quants.quantize(array, kinds.BF16), kinds.BF16
    if gguf_type == "q8_0":
        if array.shape[-1] % gguf.GGML_QUANT_SIZES[kinds.Q8_0][0] != 0:
            return array.astype(np.float16), kinds.F16
        return gguf.quants.quantize(array, kinds.Q8_0), kinds.Q8_0
    raise ExportError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")


def file_type(gguf_type: str) -> int:
    """general.file_type (llama.cpp's LlamaFileType) for a --gguf-type."""
    import gguf

    kinds = gguf.LlamaFileType
    return {"f32": kinds.ALL_F32, "f16": kinds.MOSTLY_F16, "bf16": kinds.MOSTLY_BF16, "q8_0": kinds.MOSTLY_Q8_0}[
        gguf_type
    ]


def check_gguf_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")


def require_gguf() -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ExportError("GGUF export needs the gguf package: pip install 'deltatune[gguf]' (or pip install gguf)")

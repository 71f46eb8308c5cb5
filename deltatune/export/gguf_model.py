"""A merged transformers causal LM as one GGUF file that llama.cpp, Ollama and LM Studio run.

    write_gguf(merged_model, tokenizer, "out/model-f16.gguf", gguf_type="f16")

Written with the `gguf` package (llama.cpp's own Python writer; no compiler, no llama.cpp checkout):
hyperparameters under llama.cpp's keys, every tensor under llama.cpp's name (gguf_arch.py), q/k rows
reordered for the Llama family, tied embeddings written once (llama.cpp reuses `token_embd` as the
output head when `output.weight` is absent), and the tokenizer plus chat template (gguf_vocab.py).
The file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltatune.export import gguf_arch
from deltatune.export.gguf_arch import ExportError
from deltatune.export.gguf_vocab import add_tokenizer

_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class GgufReport:
    path: Path
    architecture: str
    tensors: int
    gguf_type: str
    tokenizer: str
    bytes: int


def write_gguf(
    model: Any, tokenizer: Any, path: str | os.PathLike, *, gguf_type: str = "f16", name: str | None = None
) -> GgufReport:
    """Write a (merged) causal LM and its tokenizer as GGUF.

    Args:
        model: a transformers causal LM (Llama/SmolLM2, Mistral, Qwen2, Qwen3), adapters merged.
        gguf_type: f32 | f16 | bf16 | q8_0 for the 2-D tensors (1-D ones stay f32).
        name: general.name (default: the model's name_or_path).

    Raises:
        ExportError: unsupported architecture / rope scaling / tokenizer / type, or gguf missing.
    """
    import gguf

    gguf_arch.require_gguf()
    gguf_arch.check_gguf_type(gguf_type)
    need_merged(model)
    config = model.config
    arch = gguf_arch.arch_for(config)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch.gguf_arch)
    try:
        _add_hyperparameters(writer, config, arch, gguf_type, name)
        kind = add_tokenizer(writer, tokenizer, int(config.vocab_size), config)
        count = _add_tensors(writer, model, config, arch, gguf_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return GgufReport(out, arch.gguf_arch, count, gguf_type, kind, out.stat().st_size)


def _add_hyperparameters(writer: Any, config: Any, arch: gguf_arch.Arch, gguf_type: str, name: str | None) -> None:
    import gguf

    title = name or getattr(config, "_name_or_path", "") or "deltatune-export"
    title = Path(str(title)).name if os.sep in str(title) else str(title)
    writer.add_type("model")
    writer.add_name(title)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(gguf_arch.rope_theta(config))
    head = gguf_arch.head_dim(config)
    if arch.rope_dimension_key:
        writer.add_rope_dimension_count(head)
    if head != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head)
        writer.add_value_length(head)
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(gguf_arch.file_type(gguf_type))
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tensors(writer: Any, model: Any, config: Any, arch: gguf_arch.Arch, gguf_type: str) -> int:
    state = model.state_dict()
    n_layers = int(config.num_hidden_layers)
    embed = state.get("model.embed_tokens.weight")
    count = 0
    for hf_name, value in state.items():
        if hf_name.endswith(_SKIPPED_SUFFIXES):
            continue
        if hf_name == "lm_head.weight" and embed is not None and _same(value, embed):
            continue  # tied: llama.cpp uses token_embd as the output head
        name = gguf_arch.tensor_name(arch, n_layers, hf_name)
        if name is None:
            raise ExportError(
                f"GGUF export: tensor {hf_name!r} has no llama.cpp name for architecture {arch.gguf_arch!r}; "
                "was the adapter merged (merge_and_unload)?"
            )
        tensor = value.detach().to("cpu", torch.float32)
        heads = gguf_arch.permute_heads(arch, config, hf_name)
        if heads is not None:
            tensor = gguf_arch.llama_permute(tensor, heads)
        data, kind = gguf_arch.encode(tensor.numpy(), gguf_type)
        writer.add_tensor(name, data, raw_dtype=kind)
        count += 1
    return count


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.data_ptr() == b.data_ptr() and a.shape == b.shape:
        return True
    return a.shape == b.shape and torch.equal(a, b)


def need_merged(model: Any) -> None:
    """Refuse a TunedModel: its adapter layers have no llama.cpp names (merge first, or --to gguf-lora)."""
    from deltatune.core.tuned_model import TunedModel

    if isinstance(model, TunedModel):
        raise ExportError("write_gguf needs a plain model: call merge_and_unload() on the TunedModel first")

"""Exports: GGUF (merged model, LoRA adapter), Ollama Modelfiles, hub upload and download.

from deltatune.export import write_gguf, write_lora_gguf, write_modelfile, push_folder
"""

from __future__ import annotations

from typing import Any

from deltatune.export.gguf_arch import ARCHS, GGUF_TYPES, ExportError
from deltatune.export.hub import HubError, push_folder

_LAZY = {  # these import torch / gguf; loaded on first use so `deltatune --help` stays fast
    "write_gguf": "deltatune.export.gguf_model",
    "GgufReport": "deltatune.export.gguf_model",
    "write_lora_gguf": "deltatune.export.gguf_lora",
    "write_modelfile": "deltatune.export.ollama",
}

__all__ = ["ARCHS", "GGUF_TYPES", "ExportError", "HubError", "push_folder", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deltatune.export' has no attribute {name!r}")

"""Model registry: short names -> where the weights come from and how to fine-tune them.

A small declarative table; each entry names a hub id and, where one exists, an offline asset
(deltatune.assets) that provides the same weights without network access. `resolve_model`
accepts a registry name, a local folder, or a hub id, in that order.
"""

from deltatune.models.registry import (
    MODELS,
    ModelError,
    ModelSpec,
    get_model_spec,
    list_models,
    load_model,
    load_tokenizer,
    resolve_model,
)

__all__ = [
    "MODELS",
    "ModelError",
    "ModelSpec",
    "get_model_spec",
    "list_models",
    "load_model",
    "load_tokenizer",
    "resolve_model",
]

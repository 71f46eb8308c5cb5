"""Model registry: short names -> where the weights come from and how to fine-tune them.

A declarative catalogue (catalog.yaml, checked by catalog.py): each entry names its hub ids
(Hugging Face, ModelScope), the transformers architecture, default tuner targets by role, a
fallback chat template, and whether the checkpoint needs remote code. `resolve_model` accepts a
registry name, a local folder, or a hub id, in that order. See docs/models.md.
"""

from deltatune.models.catalog import ROLES, CatalogError, ModelSpec
from deltatune.models.registry import (
    MODELS,
    ModelError,
    RemoteCodeError,
    check_remote_code,
    get_model_spec,
    is_offline_available,
    list_models,
    load_model,
    load_tokenizer,
    local_dir,
    resolve_model,
)
from deltatune.models.templates import TEMPLATE_NAMES, render_template, template_text

__all__ = [
    "MODELS",
    "ROLES",
    "TEMPLATE_NAMES",
    "CatalogError",
    "ModelError",
    "ModelSpec",
    "RemoteCodeError",
    "check_remote_code",
    "get_model_spec",
    "is_offline_available",
    "list_models",
    "load_model",
    "load_tokenizer",
    "local_dir",
    "render_template",
    "resolve_model",
    "template_text",
]

"""Fallback chat templates for tokenizers that ship none, stored as data (templates/NAME.jinja).

A template is chosen by name in catalog.yaml and used only when the tokenizer has no
`chat_template` of its own (`load_tokenizer` installs it on the tokenizer, so training,
inference and the data pipeline all render through the one path in deltatune.data.templates,
which transformers renders in Jinja's ImmutableSandboxedEnvironment).

`render_template` renders a template here without a tokenizer, in the same kind of sandbox and
with the same whitespace options transformers uses (trim_blocks, lstrip_blocks); the files control
every output character explicitly ({{- '...' -}}), so both renderings are identical.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_NAMES = (
    "chatml",
    "llama2",
    "llama3",
    "mistral",
    "baichuan",
    "chatglm2",
    "chatglm3",
    "internlm",
    "openbuddy",
    "default",
)


@functools.cache
def template_text(name: str) -> str:
    """The Jinja source of a fallback template.

    Raises:
        KeyError: `name` is not one of TEMPLATE_NAMES.
    """
    if name not in TEMPLATE_NAMES:
        raise KeyError(f"unknown chat template {name!r}; have {', '.join(TEMPLATE_NAMES)}")
    return resources.files("deltatune.models").joinpath("templates", f"{name}.jinja").read_text(encoding="utf-8")


@functools.cache
def _compiled(name: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    return env.from_string(template_text(name))


def render_template(
    name: str,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool = False,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """Render a conversation with the fallback template `name` (sandboxed; no tokenizer needed)."""
    return _compiled(name).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token
    )

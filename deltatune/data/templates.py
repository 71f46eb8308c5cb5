"""Render a conversation to text with the tokenizer's own chat template.

The template is the one the model was trained with (`tokenizer.chat_template`, rendered by
transformers in Jinja's sandbox) or one passed explicitly. A tokenizer without a template gets
FALLBACK_TEMPLATE, rendered here in `jinja2.sandbox.ImmutableSandboxedEnvironment`, so a
template can never reach Python objects or mutate its inputs.

`split_assistant_reply` locates, inside the text one assistant turn adds, the template's
opening text, the content, and the closing text (end-of-turn marker / EOS), which is what label
masking and truncation need.
"""

from __future__ import annotations

import functools
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)
"""Plain-text template for tokenizers without one; EOS closes every assistant turn."""

# Stands in for an assistant message's content to find where the template puts content.
_SENTINEL = "DTSENTINELq7x3"


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True)
    return env.from_string(template)


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool,
    chat_template: str | None = None,
) -> str:
    """Conversation -> text, with the tokenizer's template, `chat_template`, or the fallback."""
    if chat_template is not None or getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    return _compile(FALLBACK_TEMPLATE).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        eos_token=getattr(tokenizer, "eos_token", None) or "",
        bos_token=getattr(tokenizer, "bos_token", None) or "",
    )


def split_assistant_reply(
    tokenizer: Any,
    history: list[dict[str, str]],
    reply: str,
    content: str,
    *,
    chat_template: str | None = None,
) -> tuple[str, str, str] | None:
    """Split `reply` (what the final assistant turn of `history` adds) into (opening, content, closing).

    Renders the same turn with a sentinel in place of its content: the text before the sentinel
    is the template's opening, the text after it the closing. Returns None when the real
    rendering does not fit that frame (a template whose markup depends on the content).
    """
    probe = history[:-1] + [{"role": "assistant", "content": _SENTINEL}]
    prefix = render_chat(tokenizer, history[:-1], add_generation_prompt=True, chat_template=chat_template)
    framed = render_chat(tokenizer, probe, add_generation_prompt=False, chat_template=chat_template)
    if not framed.startswith(prefix) or framed.count(_SENTINEL) != 1:
        return None
    opening, _, closing = framed[len(prefix) :].partition(_SENTINEL)
    if len(reply) < len(opening) + len(closing) or not (reply.startswith(opening) and reply.endswith(closing)):
        return None
    body = reply[len(opening) : len(reply) - len(closing)]
    if not body.strip() and content.strip():
        return None
    return opening, body, closing

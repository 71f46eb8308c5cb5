"""An Ollama `Modelfile` beside a GGUF: the chat template in Ollama's Go-template syntax, stop tokens.

A Jinja chat template cannot be translated to Go templates in general, but chat templates of the
supported families all wrap each message as `prefix[role] + content + suffix[role]` and end with a
generation prompt. We read those pieces off the tokenizer's own template by rendering it (in
Jinja's sandbox) on marker messages, then write them into one Go template of a fixed shape:

    {{- range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}
    {{ if eq .Role "system" }}<prefix>{{ .Content }}<suffix>{{ else if eq .Role "user" }}...{{ end }}
    {{ if and $last (ne .Role "assistant") }}<generation prompt>{{ end }}{{ end }}

(written on one line, so no template whitespace lands between the pieces)

A default system prompt that the template inserts when the conversation has none (SmolLM2 does)
becomes the Modelfile's SYSTEM line, which Ollama inserts the same way. `render_like_ollama` runs
the extracted pieces in Python, and tests check it against the Jinja template on several chats;
the pieces are checked the same way at export, so a template that does not fit this shape is an
error rather than a Modelfile that formats chats differently from training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.export.gguf_arch import ExportError

_ROLES = ("system", "user", "assistant")
_MARK = {"system": "\x01SYS\x01", "user": "\x01USR\x01", "assistant": "\x01AST\x01"}


@dataclass(frozen=True)
class ChatShape:
    """Per-role wrappers of a chat template, as plain strings."""

    head: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation_prompt: str
    default_system: str | None


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _between(text: str, left: str | None, right: str | None) -> str:
    start = 0 if left is None else text.index(left) + len(left)
    end = len(text) if right is None else text.index(right, start)
    return text[start:end]


def chat_shape(tokenizer: Any) -> ChatShape:
    """Read the per-role wrappers off `tokenizer.chat_template`.

    Raises:
        ExportError: no chat template, or one this reading does not reproduce.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ExportError("--ollama needs a chat template; this tokenizer has none")
    s, u, a, u2, a2 = _MARK["system"], _MARK["user"], _MARK["assistant"], _MARK["user"] + "2", _MARK["assistant"] + "2"
    msg = [{"role": "system", "content": s}, {"role": "user", "content": u}, {"role": "assistant", "content": a},
           {"role": "user", "content": u2}, {"role": "assistant", "content": a2}]  # fmt: skip
    try:
        full = _render(tokenizer, msg, False)
        only_user = _render(tokenizer, msg[:2], False)
        prompt = _render(tokenizer, msg[:2], True)
        no_system = _render(tokenizer, msg[1:3], False)
    except Exception as err:  # noqa: BLE001 - any template failure is reported the same way
        raise ExportError(f"--ollama: the chat template failed to render a plain chat: {err}") from None
    assistant_suffix = _between(full, a2, None)
    user_suffix = _between(only_user, u, None)
    between_a_u = _between(full, a, u2)
    if not between_a_u.startswith(assistant_suffix):
        raise ExportError(
            "--ollama: the chat template's assistant turns do not end the same way; write the Modelfile by hand"
        )
    user_prefix = between_a_u[len(assistant_suffix) :]
    between_s_u = _between(full, s, u)
    if not between_s_u.endswith(user_prefix):
        raise ExportError(
            "--ollama: the chat template's user turns do not start the same way; write the Modelfile by hand"
        )
    system_suffix = between_s_u[: len(between_s_u) - len(user_prefix)]
    between_u_a = _between(full, u, a)
    if not between_u_a.startswith(user_suffix):
        raise ExportError(
            "--ollama: the chat template's user turns do not end the same way; write the Modelfile by hand"
        )
    assistant_prefix = between_u_a[len(user_suffix) :]
    generation_prompt = _between(prompt, u, None)[len(user_suffix) :]
    before_system = full[: full.index(s)]
    bos = getattr(tokenizer, "bos_token", None) or ""
    uses_bos = "bos_token" in tokenizer.chat_template  # a literal marker equal to BOS is part of the turn
    head = bos if bos and uses_bos and before_system.startswith(bos) else ""
    system_prefix = before_system[len(head) :]
    default_system = None
    before_user = no_system[: no_system.index(u)]
    lead = before_user[len(head) :] if before_user.startswith(head) else before_user
    if lead != user_prefix:  # the template inserts a system turn of its own
        block = lead[: len(lead) - len(user_prefix)] if lead.endswith(user_prefix) else ""
        if not (block.startswith(system_prefix) and block.endswith(system_suffix)) or not block:
            raise ExportError(
                "--ollama: the chat template adds text before the first user turn that is not a system turn"
            )
        default_system = block[len(system_prefix) : len(block) - len(system_suffix)]
    shape = ChatShape(
        head=head,
        prefix={"system": system_prefix, "user": user_prefix, "assistant": assistant_prefix},
        suffix={"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
        generation_prompt=generation_prompt,
        default_system=default_system,
    )
    _check(tokenizer, shape)
    return shape


def render_like_ollama(shape: ChatShape, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """What the Modelfile's Go template produces for `messages` (Ollama inserts SYSTEM first when
    the chat has no system message), in Python; the head (BOS) is left to the tokenizer, as Ollama does."""
    if shape.default_system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": shape.default_system}, *messages]
    text = "".join(shape.prefix[m["role"]] + m["content"] + shape.suffix[m["role"]] for m in messages)
    if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
        text += shape.generation_prompt
    return text


def _check(tokenizer: Any, shape: ChatShape) -> None:
    chats = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"}],
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"},
        ],
    ]
    for chat in chats:
        want = _render(tokenizer, chat, True)
        want = want[len(shape.head) :] if shape.head and want.startswith(shape.head) else want
        if render_like_ollama(shape, chat) != want:
            raise ExportError(
                "--ollama: this chat template does not fit a per-role prefix/suffix shape (it changes with the "
                "position of a message); write the Modelfile's TEMPLATE by hand"
            )


def go_template(shape: ChatShape) -> str:
    """The Ollama (Go text/template) TEMPLATE for these wrappers. One line, and no `{{-` trim markers
    after literal text: they would eat the newlines that end a turn."""
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{shape.prefix[role]}{{{{ .Content }}}}{shape.suffix[role]}'
        for i, role in enumerate(_ROLES)
    )
    return (
        "{{- range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        f'{branches}{{{{ end }}}}{{{{ if and $last (ne .Role "assistant") }}}}{shape.generation_prompt}{{{{ end }}}}'
        "{{ end }}"
    )


def stop_tokens(shape: ChatShape, tokenizer: Any) -> list[str]:
    """Strings that end a reply: the assistant turn's closing marker, the next turn's opener, EOS."""
    opener = shape.prefix["user"].split("user")[0].strip() or shape.prefix["user"].strip()
    stops = [shape.suffix["assistant"].strip(), opener]
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        stops.append(eos)
    return [s for s in dict.fromkeys(stops) if s]


def write_modelfile(folder: str | Path, gguf_name: str, tokenizer: Any, *, adapter_gguf: str | None = None) -> Path:
    """Write `folder/Modelfile` for `folder/gguf_name` (and a LoRA GGUF if given); returns its path."""
    shape = chat_shape(tokenizer)
    lines = [f"FROM ./{gguf_name}"]
    if adapter_gguf:
        lines.append(f"ADAPTER ./{adapter_gguf}")
    lines.append(f'TEMPLATE """{go_template(shape)}"""')
    if shape.default_system is not None:
        lines.append(f'SYSTEM """{shape.default_system}"""')
    for stop in stop_tokens(shape, tokenizer):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    path = Path(folder) / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path

"""Ollama Modelfile: the chat template's per-role pieces, read off the Jinja template, reproduce it;
the Go template has the expected shape; stop tokens and a default system prompt carry over.
(Ollama itself is not installed here; `render_like_ollama` is the Python twin of the Go template.)"""

from __future__ import annotations

import pytest
from export_helpers import byte_level_tokenizer

from deltatune.export import ExportError
from deltatune.export.ollama import chat_shape, go_template, render_like_ollama, stop_tokens, write_modelfile

SMOLLM2 = (  # SmolLM2-Instruct's template: a default system turn when the chat has none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] "
    "+ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA2_SYS_IN_FIRST_USER = (  # the system prompt goes inside the first user turn: no per-role shape
    "{% for m in messages %}{% if m['role'] == 'system' %}{% elif m['role'] == 'user' %}[INST] "
    "{% if loop.index0 == 1 %}<<SYS>>{{ messages[0]['content'] }}<</SYS>> {% endif %}{{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
)
CHATS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "salut"},
     {"role": "user", "content": "and bye?"}],
]  # fmt: skip


def _tokenizer(template: str | None):
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize("template", [None, SMOLLM2, LLAMA3], ids=["chatml", "smollm2", "llama3"])
def test_shape_reproduces_the_jinja_template(template):
    tokenizer = byte_level_tokenizer()
    if template is not None:
        tokenizer.chat_template = template
        tokenizer.add_special_tokens(
            {"bos_token": "<|im_start|>"} if template == SMOLLM2 else {"bos_token": "<|begin_of_text|>"}
        )
    shape = chat_shape(tokenizer)
    for chat in CHATS:
        want = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert shape.head + render_like_ollama(shape, chat) == want


def test_smollm2_default_system_prompt_becomes_system_line(tmp_path):
    tokenizer = _tokenizer(SMOLLM2)
    tokenizer.add_special_tokens({"bos_token": "<|im_start|>"})  # SmolLM2's BOS is also its turn opener
    shape = chat_shape(tokenizer)
    assert shape.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert shape.head == "" and shape.prefix["system"] == "<|im_start|>system\n"
    text = write_modelfile(tmp_path, "model-f16.gguf", tokenizer).read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text


def test_chatml_modelfile_golden(tmp_path):
    tokenizer = byte_level_tokenizer()
    path = write_modelfile(tmp_path, "model-q8_0.gguf", tokenizer, adapter_gguf="adapter-f32.gguf")
    template = (
        '{{- range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}{{ if eq .Role "system" }}'
        "<|im_start|>system\n{{ .Content }}<|im_end|>\n"
        '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
        '{{ end }}{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}{{ end }}'
    )
    assert path.read_text() == (
        "FROM ./model-q8_0.gguf\nADAPTER ./adapter-f32.gguf\n"
        f'TEMPLATE """{template}"""\n'
        'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|im_start|>"\n'
    )
    assert go_template(chat_shape(tokenizer)) == template


def test_llama3_stops_and_bos_left_to_the_tokenizer():
    tokenizer = _tokenizer(LLAMA3)
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    shape = chat_shape(tokenizer)
    assert shape.head == "<|begin_of_text|>"  # Ollama's tokenizer adds BOS; the template must not
    assert "<|begin_of_text|>" not in go_template(shape)
    assert stop_tokens(shape, tokenizer) == ["<|eot_id|>", "<|start_header_id|>"]


@pytest.mark.parametrize("template, match", [(None, "needs a chat template"), (LLAMA2_SYS_IN_FIRST_USER, "by hand")])
def test_templates_that_do_not_fit_are_refused(template, match):
    tokenizer = _tokenizer(template)
    if template is None:
        tokenizer.chat_template = None
    with pytest.raises(ExportError, match=match):
        chat_shape(tokenizer)

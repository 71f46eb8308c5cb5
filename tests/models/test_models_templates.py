"""Fallback chat templates: golden renderings of one fixed conversation per family format.

The goldens were written from each family's documented prompt format (Meta's Llama 2
chat_completion and Llama 3 model card, Mistral's [INST] format, Qwen's ChatML, Baichuan 2's
build_chat_input, ChatGLM2's build_prompt, ChatGLM3's role tokens, InternLM's build_inputs, and
ms-swift's openbuddy / default templates), not from the templates' own output.
"""

from __future__ import annotations

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from deltatune.models import TEMPLATE_NAMES, render_template, template_text

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]

# name -> (bos, eos, golden full conversation, text the generation prompt adds after the last user turn)
GOLDEN = {
    "chatml": (
        "", "<|im_end|>",
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n",
        "<|im_start|>assistant\n",
    ),
    "llama2": (
        "<s>", "</s>",
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] 2+2? [/INST] 4 </s>",
        "",
    ),
    "llama3": (
        "<|begin_of_text|>", "<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "mistral": (
        "<s>", "</s>",
        "<s>[INST] You are terse.\n\nHi [/INST]Hello!</s>[INST] 2+2? [/INST]4</s>",
        "",
    ),
    "baichuan": (
        "<s>", "</s>",
        "You are terse.<reserved_106>Hi<reserved_107>Hello!<reserved_106>2+2?<reserved_107>4",
        "<reserved_107>",
    ),
    "chatglm2": (
        "", "</s>",
        "[gMASK]sopYou are terse.\n\n[Round 1]\n\n问：Hi\n\n答：Hello!\n\n[Round 2]\n\n问：2+2?\n\n答：4",
        "",
    ),
    "chatglm3": (
        "", "</s>",
        "[gMASK]sop<|system|>\n You are terse.<|user|>\n Hi<|assistant|>\n Hello!<|user|>\n 2+2?<|assistant|>\n 4",
        "<|assistant|>",
    ),
    "internlm": (
        "<s>", "</s>",
        "<s><|System|>:You are terse.\n<|User|>:Hi<eoh>\n<|Bot|>:Hello!<eoa>\n<|User|>:2+2?<eoh>\n<|Bot|>:4<eoa>\n",
        "",
    ),
    "openbuddy": (
        "<s>", "</s>",
        "<s>You are terse.\n\nUser: Hi\nAssistant:Hello!\nUser: 2+2?\nAssistant:4",
        "",
    ),
    "default": (
        "", "</s>",
        "You are terse.\n\n### Human:\nHi\n\n### Assistant:\nHello!\n\n### Human:\n2+2?\n\n### Assistant:\n4",
        "",
    ),
}  # fmt: skip


def test_every_template_has_a_golden():
    assert sorted(GOLDEN) == sorted(TEMPLATE_NAMES)


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_template_renders_the_documented_format(name):
    bos, eos, golden, generation = GOLDEN[name]
    assert render_template(name, CONVERSATION, bos_token=bos, eos_token=eos) == golden
    prompt = render_template(name, CONVERSATION[:-1], add_generation_prompt=True, bos_token=bos, eos_token=eos)
    without_answer = render_template(name, CONVERSATION[:-1], bos_token=bos, eos_token=eos)
    assert prompt == without_answer + generation
    # prefix-stable: the label masker cuts each answer out of one rendering
    assert golden.startswith(prompt) and golden[len(prompt) :].lstrip().startswith("4")


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_transformers_renders_the_same_text(name):
    """Installed as tokenizer.chat_template, transformers' own sandbox must produce the same string."""
    bos, eos, golden, _ = GOLDEN[name]
    for messages, gen in [(CONVERSATION, False), (CONVERSATION[:-1], True), (CONVERSATION[1:], False)]:
        theirs, _ = render_jinja_template(
            [messages], chat_template=template_text(name), add_generation_prompt=gen, bos_token=bos, eos_token=eos
        )
        assert theirs[0] == render_template(name, messages, add_generation_prompt=gen, bos_token=bos, eos_token=eos)


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_without_a_system_message(name):
    bos, eos, golden, _ = GOLDEN[name]
    text = render_template(name, CONVERSATION[1:], bos_token=bos, eos_token=eos)
    assert "You are terse." not in text
    assert text.index("Hi") < text.index("Hello!") < text.index("2+2?") < text.rindex("4")


def test_templates_render_in_the_immutable_sandbox():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from deltatune.models.templates import _compiled

    assert all(isinstance(_compiled(name).environment, ImmutableSandboxedEnvironment) for name in TEMPLATE_NAMES)

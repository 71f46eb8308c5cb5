"""Label masking, EOS supervision, truncation, dropped rows, pad == eos, collation and packing."""

from __future__ import annotations

import pytest
import torch

from deltatune.data import (
    IGNORE_INDEX,
    DataError,
    collate,
    encode_chat,
    encode_classification,
    encode_rows,
    pack,
    pad_token_id,
)
from deltatune.data.report import RowError

CHAT = [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "hello how are you"},
    {"role": "assistant", "content": "I am fine thank you"},
    {"role": "user", "content": "the capital of France"},
    {"role": "assistant", "content": "Paris"},
]


def _supervised(tokenizer, example) -> str:
    return tokenizer.decode(
        [t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab != IGNORE_INDEX]
    )


def _masked(tokenizer, example) -> str:
    return tokenizer.decode(
        [t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab == IGNORE_INDEX]
    )


def test_only_answers_and_their_end_of_turn_are_supervised(tokenizer):
    example = encode_chat(tokenizer, CHAT, max_length=512)
    assert len(example["input_ids"]) == len(example["labels"]) == len(example["attention_mask"])
    # Labels equal input ids where supervised (the model shifts them), -100 elsewhere.
    assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(example["input_ids"], example["labels"], strict=True))
    assert _supervised(tokenizer, example) == "I am fine thank you<|im_end|>\nParis<|im_end|>\n"
    masked = _masked(tokenizer, example)
    for prompt_text in ("be nice", "hello how are you", "the capital of France", "<|im_start|>assistant\n"):
        assert prompt_text in masked
    # The EOS token closing each answer is a supervised label.
    eos = tokenizer.eos_token_id
    assert [lab for lab in example["labels"] if lab == eos] == [eos, eos]
    # The whole sequence is exactly the template's rendering.
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == rendered


def test_truncation_cuts_answer_content_but_keeps_closing_tokens(tokenizer):
    full = encode_chat(tokenizer, CHAT[:3], max_length=512)
    n = len(full["input_ids"])
    cut = encode_chat(tokenizer, CHAT[:3], max_length=n - 3)
    assert len(cut["input_ids"]) == n - 3
    assert cut["input_ids"][-2:] == full["input_ids"][-2:]  # <|im_end|> "\n" survive
    assert cut["labels"][-2] == tokenizer.eos_token_id
    supervised = _supervised(tokenizer, cut)
    assert supervised.endswith("<|im_end|>\n") and supervised != _supervised(tokenizer, full)
    assert supervised.startswith("I")


def test_truncation_drops_later_turns_first(tokenizer):
    first_turn = encode_chat(tokenizer, CHAT[:3], max_length=512)
    example = encode_chat(tokenizer, CHAT, max_length=len(first_turn["input_ids"]) + 3)
    # Not even one token of "Paris" fits with its prompt: the second turn is dropped whole.
    assert example == first_turn


def test_rows_without_room_for_an_answer_are_dropped_and_counted(tokenizer):
    limit = len(encode_chat(tokenizer, CHAT[1:3], max_length=512)["input_ids"])
    long_prompt = [{"role": "user", "content": "hello " * limit}, {"role": "assistant", "content": "fine"}]
    assert encode_chat(tokenizer, long_prompt, max_length=limit) is None
    rows = [{"messages": CHAT[1:3]}] * 3 + [{"messages": long_prompt}]
    examples, report = encode_rows(tokenizer, rows, max_length=limit)
    assert len(examples) == 3
    assert report.reasons == {"labels_fully_masked": 1}
    assert report.examples["labels_fully_masked"][0].startswith("row 3")
    with pytest.raises(DataError, match="labels_fully_masked: 4"):
        encode_rows(tokenizer, [{"messages": long_prompt}] * 4, max_length=limit)


def test_fallback_template_is_used_and_appends_eos(tokenizer_without_template):
    tok = tokenizer_without_template
    example = encode_chat(tok, CHAT[1:3], max_length=512)
    assert tok.decode(example["input_ids"]).startswith("### User:\nhello how are you")
    assert _supervised(tok, example) == "I am fine thank you<|im_end|>\n\n"
    assert tok.eos_token_id in [lab for lab in example["labels"] if lab != IGNORE_INDEX]


def test_explicit_template_without_end_marker_gets_a_supervised_eos(tokenizer):
    bare = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    bare += "{% if add_generation_prompt %}assistant: {% endif %}"
    example = encode_chat(tokenizer, CHAT[1:3], max_length=512, chat_template=bare)
    assert example["labels"][-1] == example["input_ids"][-1] == tokenizer.eos_token_id
    assert _supervised(tokenizer, example) == "I am fine thank you\n<|im_end|>"
    # Only the final answer gets the extra EOS; the first turn stays as the template renders it.
    two = encode_chat(tokenizer, CHAT[1:], max_length=512, chat_template=bare)
    assert two["input_ids"].count(tokenizer.eos_token_id) == 1
    # Truncation reserves room for it.
    cut = encode_chat(tokenizer, CHAT[1:3], max_length=len(example["input_ids"]) - 2, chat_template=bare)
    assert cut["labels"][-1] == tokenizer.eos_token_id


def test_template_that_rewrites_history_is_reported(tokenizer):
    # Shows only the last user turn: earlier text changes as the conversation grows.
    unstable = (
        "{% for m in messages %}{% if loop.last or m['role'] != 'user' %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(RowError) as err:
        encode_chat(tokenizer, CHAT, max_length=512, chat_template=unstable)
    assert err.value.reason == "template_mismatch"


def test_pad_equal_to_eos_keeps_real_eos_supervised(tokenizer_pad_is_eos):
    tok = tokenizer_pad_is_eos
    assert tok.pad_token_id == tok.eos_token_id
    short = encode_chat(tok, CHAT[1:3], max_length=512)
    long = encode_chat(tok, CHAT, max_length=512)
    batch = collate([short, long], pad_token_id(tok))
    n = len(short["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(long["input_ids"]))
    assert batch["labels"][0, :n].tolist() == short["labels"]
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, n:] == tok.eos_token_id).all()  # padded with the eos id...
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert batch["labels"][0, n - 2].item() == tok.eos_token_id  # ...yet the real eos is a label


def test_collate_pads_to_multiple_and_classification_labels(tokenizer):
    examples = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 1},
        {"input_ids": [5], "attention_mask": [1], "labels": 0},
    ]
    batch = collate(examples, pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long


def test_encode_classification(tokenizer):
    out = encode_classification(
        tokenizer, {"text": "good film", "label": "pos"}, max_length=4, label2id={"neg": 0, "pos": 1}
    )
    assert out["labels"] == 1 and 0 < len(out["input_ids"]) <= 4
    with pytest.raises(RowError, match="unknown_label"):
        encode_classification(tokenizer, {"text": "x", "label": "meh"}, max_length=4, label2id={"pos": 1})


def test_pack_keeps_examples_whole_and_masks_boundaries(tokenizer):
    examples = [encode_chat(tokenizer, CHAT[1:3], max_length=512) for _ in range(3)]
    n = len(examples[0]["input_ids"])
    packs = pack(examples, max_length=2 * n + 1)
    assert [len(p["input_ids"]) for p in packs] == [2 * n, n]
    first = packs[0]
    assert first["input_ids"] == examples[0]["input_ids"] * 2
    assert first["position_ids"] == list(range(n)) * 2
    assert first["labels"][n] == IGNORE_INDEX  # no prediction across the boundary
    assert first["labels"][n - 2] == tokenizer.eos_token_id
    batch = collate(packs, pad_id=pad_token_id(tokenizer))
    assert batch["position_ids"].shape == (2, 2 * n)
    with pytest.raises(ValueError, match="max_length"):
        pack(examples, max_length=n - 1)


def test_non_chat_rows_are_refused_with_a_clear_error(tokenizer):
    from deltatune.data import DataError, encode_rows

    with pytest.raises(DataError, match="classification rows .* trains on chat"):
        encode_rows(tokenizer, [{"text": "good", "label": 1}], max_length=32)

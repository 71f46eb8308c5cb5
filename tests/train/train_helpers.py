"""Tiny, offline assets for training tests: a byte-level BPE tokenizer with a ChatML template, a
tiny Llama sized to it (random weights, seeded), and synthetic chat data."""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def synthetic_rows(n: int = 96, seed: int = 0) -> list[dict]:
    """Chat rows "add A B" -> "A plus B is C" with varied lengths (different token counts per row)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        question = f"add {WORDS[a]} and {WORDS[b]}" + " please" * rng.randrange(3)
        answer = f"{WORDS[a]} plus {WORDS[b]} is {a + b}" + "!" * rng.randrange(4)
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [m["content"] for r in synthetic_rows(200) for m in r["messages"]] + ["user assistant system"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=CHATML
    )


def build_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=1, pad_token_id=1,
        bos_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def make_assets(folder: Path) -> tuple[Path, Path]:
    """(model folder with tokenizer, data.jsonl) under `folder`."""
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer))
    model_dir = folder / "tiny-llama"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows()), encoding="utf-8")
    return model_dir, data


def sft_flags(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """Fast `deltatune sft` flags for the tiny assets."""
    return [
        "sft", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out), "--batch-size", "4",
        "--max-length", "32", "--val-size", "16", "--num-samples", "0", "--lr", "1e-2", "--max-steps", "6",
        "--save-steps", "3", "--tuner-args", "r=4,lora_alpha=8,target_modules=[q_proj,v_proj]", *extra,
    ]  # fmt: skip

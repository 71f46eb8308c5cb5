"""Tiny random vision models and tokenizers built offline from configs (tests, docs, demos).

Random weights: these exercise the mechanics (injection, training steps, save/load, generation),
not the quality of any real checkpoint. Everything is seeded and builds in well under a second.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CAPTION_WORDS = (
    "a photo of the red green blue cat dog bird car tree house on in with small big and is sitting "
    "flying running next to white black sky grass road"
).split()
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<image>", "<unk>")


def byte_unicode_map() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def tiny_clip_tokenizer(max_length: int = 16):
    """A CLIPTokenizer with a byte-level vocabulary and no merges (514 tokens), built offline."""
    from transformers import CLIPTokenizer

    chars = list(byte_unicode_map().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_unet(seed: int = 0, cross_attention_dim: int = 16) -> nn.Module:
    """UNet2DConditionModel: 2 blocks (8, 16 channels), one cross-attention level, 4 latent channels."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=4, attention_head_dim=4,
    ).eval()  # fmt: skip


def tiny_sd_pipeline(seed: int = 0, unet: nn.Module | None = None):
    """StableDiffusionPipeline from tiny configs: UNet, AutoencoderKL (x2 downsampling), CLIP text
    encoder, byte-level CLIP tokenizer, DDIM scheduler (100 train steps). 16x16 images."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed + 1)
    vocab = len(tokenizer)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
            max_position_embeddings=tokenizer.model_max_length, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        )
    ).eval()  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16,
    ).eval()  # fmt: skip
    scheduler = DDIMScheduler(num_train_timesteps=100, steps_offset=1, clip_sample=False)
    pipe = StableDiffusionPipeline(
        unet=unet if unet is not None else tiny_unet(seed), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_word_tokenizer(words: tuple[str, ...] | list[str] = CAPTION_WORDS):
    """A word-level fast tokenizer: <pad>=0, <s>=1, </s>=2, <image>=3, <unk>=4, then `words`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )  # fmt: skip


def tiny_llava(vocab_size: int, seed: int = 0, image_token_id: int = 3) -> nn.Module:
    """LlavaForConditionalGeneration: CLIP vision tower (16x16 images, 4x4 patches -> 16 image
    tokens), 2-layer MLP projector, 2-layer Llama language model (hidden 16)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision: dict[str, Any] = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4
    )
    text: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text), image_token_id=image_token_id,
        vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def save_tiny_t5(folder: str, texts: list[str], seed: int = 0, d_model: int = 32) -> str:
    """A tiny T5 (2+2 layers, random weights) with a lower-cased word-level tokenizer whose
    vocabulary is every word of `texts`, saved as a transformers folder (`--task seq2seq` demos)."""
    import re
    from pathlib import Path

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    vocab = {token: i for i, token in enumerate(("<pad>", "<unk>", "</s>", *words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_decoder_layers=2,
        num_heads=4, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0, dropout_rate=0.0,
    )  # fmt: skip
    out = Path(folder)
    T5ForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def save_tiny_llava(folder: str, seed: int = 0) -> str:
    """tiny_llava + tiny_word_tokenizer saved as one transformers folder (`--task image-to-text` demos)."""
    tokenizer = tiny_word_tokenizer()
    model = tiny_llava(len(tokenizer), seed=seed, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# -- `python -m deltatune.tasks.tiny OUT`: tiny models and data for the task demos ------------------
NUMBERS = "zero one two three four five six seven eight nine".split()
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (240, 240, 240)}


def demo_rows(n: int = 400, seed: int = 0) -> list[dict[str, str]]:
    """Instruction rows "add four and two" -> "four plus two is 6" (alpaca style)."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append(
            {
                "instruction": f"add {NUMBERS[a]} and {NUMBERS[b]}",
                "output": f"{NUMBERS[a]} plus {NUMBERS[b]} is {a + b}",
            }
        )
    return rows


def demo_captions(folder: str, n: int = 120, size: int = 16, seed: int = 0) -> str:
    """n PNG images (a colored square on a dark or light ground) and captions.jsonl describing them."""
    import json
    import random
    from pathlib import Path

    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        color, dark = rng.choice(sorted(COLORS)), rng.random() < 0.5
        pixels = np.full((size, size, 3), 20 if dark else 120, dtype=np.uint8)
        pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = COLORS[color]
        Image.fromarray(pixels).save(out / f"{i}.png")
        rows.append({"image": str(out / f"{i}.png"), "caption": f"a {color} square on {'black' if dark else 'grey'}"})
    path = out / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def main(argv: list[str] | None = None) -> None:
    """Write OUT/{tiny-t5, tiny-sd, tiny-llava, add.jsonl, captions/} (random weights, seconds)."""
    import json
    import sys
    from pathlib import Path

    out = Path((argv if argv is not None else sys.argv[1:] or ["tiny-assets"])[0])
    out.mkdir(parents=True, exist_ok=True)
    rows = demo_rows()
    (out / "add.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    save_tiny_t5(str(out / "tiny-t5"), [r["instruction"] + " " + r["output"] for r in rows])
    tiny_sd_pipeline().save_pretrained(out / "tiny-sd")
    words = list(CAPTION_WORDS) + ["square", "grey", "black"]
    tokenizer = tiny_word_tokenizer(words)
    model = tiny_llava(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    model.save_pretrained(out / "tiny-llava")
    tokenizer.save_pretrained(out / "tiny-llava")
    demo_captions(str(out / "captions"))
    print(f"wrote {out}/: tiny-t5, tiny-sd, tiny-llava, add.jsonl, captions/captions.jsonl")


if __name__ == "__main__":
    main()

"""Tiny offline assets for every task on the training engine: model folders built from configs
(random weights, seeded) and synthetic data files with a learnable signal."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

from deltatune.tasks.tiny import save_tiny_llava, save_tiny_t5

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

from train_helpers import make_assets, synthetic_rows  # noqa: E402

WORDS = "good great fine nice bad awful poor sad the a film movie day book city river alice bob paris rome".split()
POSITIVE, NEGATIVE = {"good", "great", "fine", "nice"}, {"bad", "awful", "poor", "sad"}
PEOPLE, PLACES = {"alice", "bob"}, {"paris", "rome"}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 16, no dropout) with a word-level fast tokenizer over WORDS."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")  # fmt: skip
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.3)  # fmt: skip
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        cue = rng.choice(sorted(POSITIVE if label else NEGATIVE))
        words = [rng.choice(["the", "a"]), rng.choice(["film", "movie", "day", "book"]), cue]
        words += [rng.choice(["the", "a", "city", "river"]) for _ in range(rng.randrange(4))]
        rows.append({"text": " ".join(words), "label": "positive" if label else "negative"})
    return rows


def ner_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens = [
            rng.choice(sorted(PEOPLE | PLACES | {"the", "a", "film", "day", "city"}))
            for _ in range(rng.randrange(3, 8))
        ]
        tags = ["B-PER" if t in PEOPLE else "B-LOC" if t in PLACES else "O" for t in tokens]
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def tiny_vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder)
    return folder


COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (240, 240, 240)}


def caption_images(folder: Path, n: int, size: int = 16, seed: int = 0) -> Path:
    """n PNG images (a colored square on a dark or light ground) with captions, as captions.jsonl."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        color = rng.choice(sorted(COLORS))
        pixels = np.full((size, size, 3), 20 if i % 2 else 120, dtype=np.uint8)
        pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = COLORS[color]
        path = folder / f"{i}.png"
        Image.fromarray(pixels).save(path)
        rows.append({"image": str(path), "caption": f"a {color} square"})
    return _jsonl(folder / "captions.jsonl", rows)


def tiny_sd_folder(folder: Path) -> Path:
    from deltatune.tasks.tiny import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(folder)
    return folder


class TaskAssets(dict):
    """task -> (model, dataset) for tiny runs, each built on first use (diffusers and LLaVA
    folders cost seconds that runs of other tasks need not pay)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def _llama(self) -> tuple[Path, Path]:
        if not (self.root / "tiny-llama").is_dir():
            make_assets(self.root)
        return self.root / "tiny-llama", self.root / "data.jsonl"

    def _bert(self) -> str:
        folder = self.root / "tiny-bert"
        return str(folder if folder.is_dir() else tiny_bert(folder))

    def _captions(self) -> str:
        path = self.root / "captions" / "captions.jsonl"
        return str(path if path.is_file() else caption_images(self.root / "captions", 40))

    def _notes(self) -> str:
        text = self.root / "notes.txt"
        paragraphs = [" ".join(m["content"] for m in r["messages"]) for r in synthetic_rows(120, seed=1)]
        text.write_text("\n\n".join(" ".join(paragraphs[i : i + 2]) for i in range(0, 120, 2)), encoding="utf-8")
        return str(text)

    def __missing__(self, task: str) -> tuple[str, str]:
        root = self.root
        if task == "causal-lm":
            value = tuple(map(str, self._llama()))
        elif task == "pretrain":
            value = (str(self._llama()[0]), self._notes())
        elif task == "sequence-classification":
            value = (self._bert(), str(_jsonl(root / "sentiment.jsonl", sentiment_rows(64))))
        elif task == "token-classification":
            value = (self._bert(), str(_jsonl(root / "ner.jsonl", ner_rows(64))))
        elif task == "image-classification":
            value = (str(tiny_vit(root / "tiny-vit")), "digits#64")
        elif task == "seq2seq":
            texts = [m["content"] for r in synthetic_rows(200) for m in r["messages"]]
            value = (save_tiny_t5(str(root / "tiny-t5"), texts), str(self._llama()[1]))
        elif task == "text-to-image":
            value = (str(tiny_sd_folder(root / "tiny-sd")), self._captions())
        elif task == "image-to-text":
            value = (save_tiny_llava(str(root / "tiny-llava")), self._captions())
        else:
            raise KeyError(task)
        self[task] = value
        return value


def build_all(root: Path) -> TaskAssets:
    """task -> (model, dataset), built lazily."""
    return TaskAssets(root)

"""Image-to-text LoRA on LLaVA-style models: caption batches, a training step, generation.

A LLaVA model is vision tower -> projector -> language model; each image becomes N "image
tokens" whose embeddings the projector writes into the text sequence. Tuning the language model
only (the usual recipe) means targeting its projections by a regex that names `language_model`,
so the vision tower's identically named q_proj/v_proj stay untouched; the projector can train in
full through `modules_to_save=["multi_modal_projector"]`.

A training row is coco-en style, {"image": path_or_array, "caption": str}; the sequence is

    <s> <image> x N  prompt tokens  caption tokens  </s>
    labels: -100 ... -100 (bos, image, prompt)      caption ids  eos id

so the loss is on the caption only. For generation the prompt part is left-padded and the model
continues it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.tasks.image import BadImage, ImageReport, ImageTransform

IGNORE_INDEX = -100


def language_model_targets(projections: Sequence[str] = ("q_proj", "v_proj")) -> str:
    """A target_modules regex matching these projections inside the language model only."""
    names = "|".join(projections)
    return rf".*language_model.*\.({names})"


def count_image_tokens(config: Any) -> int:
    """Image tokens per image for a LLaVA config: one per patch (+1 CLS with the "full" strategy)."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0)


@dataclass
class CaptionCollator:
    """Rows {"image": ..., "caption": str} -> LLaVA inputs with caption-only labels.

    Rows whose image is unusable or whose caption is empty are dropped and counted in `report`;
    a batch without a usable row gives None."""

    tokenizer: Any
    """Has encode(text, add_special_tokens=False), bos/eos/pad_token_id, decode()."""
    transform: ImageTransform
    num_image_tokens: int
    image_token_id: int
    prompt: str = ""
    max_caption_tokens: int = 32
    image_key: str = "image"
    caption_key: str = "caption"
    report: ImageReport = field(default_factory=ImageReport)

    def _prefix(self) -> list[int]:
        prompt = self.tokenizer.encode(self.prompt, add_special_tokens=False) if self.prompt else []
        return [self.tokenizer.bos_token_id] + [self.image_token_id] * self.num_image_tokens + prompt

    def _usable(self, rows: Sequence[dict[str, Any]], with_caption: bool) -> list[tuple[torch.Tensor, list[int]]]:
        usable = []
        for position, row in enumerate(rows):
            self.report.seen += 1
            try:
                pixels = self.transform(row.get(self.image_key))
                caption: list[int] = []
                if with_caption:
                    text = row.get(self.caption_key)
                    if not isinstance(text, str) or not text.strip():
                        raise BadImage("label", f"caption {text!r} is empty or not a string")
                    caption = self.tokenizer.encode(text.strip(), add_special_tokens=False)[: self.max_caption_tokens]
            except BadImage as error:
                self.report.add_bad(row.get("id", position), error)
                continue
            usable.append((pixels, caption))
        self.report.kept += len(usable)
        return usable

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor] | None:
        """Training batch: right-padded input_ids, attention_mask, labels, pixel_values."""
        usable = self._usable(rows, with_caption=True)
        if not usable:
            return None
        prefix = self._prefix()
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        sequences = [prefix + caption + [eos] for _, caption in usable]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(usable), width), pad, dtype=torch.long)  # (B, T)
        labels = torch.full((len(usable), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(usable), width), dtype=torch.long)  # (B, T)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            labels[row, len(prefix) : len(sequence)] = torch.tensor(sequence[len(prefix) :])
            attention_mask[row, : len(sequence)] = 1
        pixel_values = torch.stack([pixels for pixels, _ in usable])  # (B, C, H, W)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": pixel_values,
        }

    def generation_inputs(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor] | None:
        """Prompt-only batch (left-padded, so every row continues at the same position)."""
        usable = self._usable(rows, with_caption=False)
        if not usable:
            return None
        prefix = self._prefix()
        input_ids = torch.tensor([prefix] * len(usable), dtype=torch.long)  # (B, T): same prompt, no padding needed
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.stack([pixels for pixels, _ in usable]),  # (B, C, H, W)
        }


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    """One optimizer step on the caption loss (the model's own shifted cross-entropy)."""
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def generate_captions(
    model: nn.Module, collator: CaptionCollator, rows: Sequence[dict[str, Any]], max_new_tokens: int = 8
) -> list[str]:
    """Greedy captions for the usable rows (the report counts the others)."""
    inputs = collator.generation_inputs(rows)
    if inputs is None:
        return []
    model.eval()
    pad = collator.tokenizer.pad_token_id
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)  # (B, T + new)
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    return [collator.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new_tokens]


def caption_pairs(rows: Sequence[dict[str, Any]]) -> list[tuple[Any, str, str]]:
    """(image, caption, prompt) of canonical image-caption rows ({"messages", "images"}, as the
    loader converts `{"image", "caption"}` rows) or of raw {"image", "caption"} rows."""
    pairs = []
    for row in rows:
        if "images" in row and "messages" in row:
            user = next(m["content"] for m in row["messages"] if m["role"] == "user")
            answer = [m["content"] for m in row["messages"] if m["role"] == "assistant"][-1]
            pairs.append((row["images"][0], answer, user.replace("<image>", "").strip()))
        else:
            pairs.append((row.get("image"), row.get("caption"), ""))
    return pairs

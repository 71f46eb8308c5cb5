"""image-to-text: captioning with a LLaVA-style vision-language model (see tasks/vision_language.py).

    deltatune sft --task image-to-text --model LLAVA_FOLDER --dataset captions.jsonl

`--model` is a local folder that `AutoModelForImageTextToText` loads (LLaVA layout: vision tower
-> multi_modal_projector -> language model) with its tokenizer. Roles: the vision tower stays
frozen, the projector trains in full (`modules_to_save`), and LoRA targets the language model's
q/v projections only (a regex naming `language_model`, so the vision tower's projections of the
same name are untouched). Rows are `{"image", "caption"}` (image-caption data, coco-en style);
each image becomes the model's N image tokens after BOS, then the row's prompt, the caption and
EOS; only the caption and EOS are supervised. The loss is summed over caption tokens and
normalised by the step's count. Metrics: held-out loss and ROUGE-L of greedy captions (up to 16
held-out images); sample captions before and after.

Not yet: the model's own AutoProcessor and chat template (Qwen-VL style prompts); the sequence is
built from the tokenizer and the config's image token as above.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.tasks.base import Log, TaskData, batched
from deltatune.tasks.image import BadImage, ImageReport, ImageTransform
from deltatune.tasks.vision_language import IGNORE_INDEX, caption_pairs, count_image_tokens, language_model_targets

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ROUGE_ROWS = 16


class ImageToTextTask:
    name = "image-to-text"

    def __init__(self) -> None:
        self.tokenizer: Any = None
        self.config: Any = None
        self.num_image_tokens = 0
        self.image_token_id = 0

    def load_processor(self, args: Any, log: Log, given: Any = None) -> ImageTransform:
        from transformers import AutoConfig, AutoTokenizer

        from deltatune.models import ModelError, check_remote_code

        folder = Path(args.model)
        if not (folder / "config.json").is_file():
            raise ModelError(f"--model {args.model}: --task {self.name} needs a local vision-language model folder")
        check_remote_code(str(folder), trust_remote_code=args.trust_remote_code)
        self.config = AutoConfig.from_pretrained(folder, trust_remote_code=args.trust_remote_code)
        if not hasattr(self.config, "vision_config"):
            raise ModelError(f"--model {args.model}: no vision_config in config.json (not a vision-language model)")
        self.tokenizer = given or AutoTokenizer.from_pretrained(folder, trust_remote_code=args.trust_remote_code)
        self.num_image_tokens = count_image_tokens(self.config)
        self.image_token_id = int(getattr(self.config, "image_token_id", None) or self.config.image_token_index)
        side = int(self.config.vision_config.image_size)
        mean, std = CLIP_MEAN, CLIP_STD
        processor = folder / "preprocessor_config.json"
        if processor.is_file():
            data = json.loads(processor.read_text(encoding="utf-8"))
            mean, std = tuple(data.get("image_mean") or mean), tuple(data.get("image_std") or std)
        return ImageTransform((side, side), channels=3, mean=mean, std=std)

    def prepare_data(self, args: Any, processor: ImageTransform, log: Log) -> TaskData:
        from deltatune.data import DataError, load_rows
        from deltatune.train.data import split_rows

        rows, report = load_rows(args.dataset, seed=args.seed)
        log(report.summary())
        if not all("images" in r or "image" in r for r in rows):
            raise DataError(f"--dataset {args.dataset}: --task {self.name} needs image-caption rows")
        train_rows, val_rows = split_rows(rows, args.val_size, args.seed, log)
        images = ImageReport()
        train, val = self._encode(train_rows, processor, images, args), self._encode(val_rows, processor, images, args)
        if not train:
            raise DataError(f"--dataset {args.dataset}: no usable images ({images.summary()})")
        log(f"{len(train)} train / {len(val)} held-out captioned images, {self.num_image_tokens} image tokens each; "
            f"{images.summary()}")  # fmt: skip
        return TaskData(train, val)

    def _encode(self, rows: list[dict], transform: ImageTransform, report: ImageReport, args: Any) -> list[dict]:
        examples = []
        for position, (image, caption, prompt) in enumerate(caption_pairs(rows)):
            report.seen += 1
            try:
                if not isinstance(caption, str) or not caption.strip():
                    raise BadImage("label", "caption is empty or not a string")
                pixels = transform(image)
            except BadImage as error:
                report.add_bad(position, error)
                continue
            prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
            room = max(1, args.max_length - self.num_image_tokens - len(prompt_ids) - 2)
            caption_ids = self.tokenizer.encode(caption.strip(), add_special_tokens=False)[:room]
            examples.append({"pixel_values": pixels, "prompt_ids": prompt_ids, "caption_ids": caption_ids,
                             "caption": caption.strip()})  # fmt: skip
        report.kept += len(examples)
        return examples

    def load_model(self, args: Any, data: TaskData, log: Log) -> nn.Module:
        import transformers

        from deltatune.models import ModelError
        from deltatune.models.registry import DTYPES

        try:
            return transformers.AutoModelForImageTextToText.from_pretrained(
                args.model, dtype=getattr(torch, DTYPES[args.dtype]), trust_remote_code=args.trust_remote_code
            )
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(
                f"--model {args.model}: not loadable as an image-text-to-text model: {first[:300]}"
            ) from None

    def tuner_defaults(self, args: Any, model: nn.Module | None, model_spec: Any) -> dict[str, Any] | None:
        if model is None:
            return None  # the projector's name is read from the model
        names = {name for name, _ in model.named_modules()}
        projector = next((n for n in names if n.endswith("multi_modal_projector")), None)
        return {
            "target_modules": language_model_targets(),
            "modules_to_save": [projector.rsplit(".", 1)[-1]] if projector else None,
        }

    def _prefix(self, example: dict[str, Any]) -> list[int]:
        return [self.tokenizer.bos_token_id] + [self.image_token_id] * self.num_image_tokens + example["prompt_ids"]

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        sequences = [(self._prefix(e), e["caption_ids"] + [eos]) for e in examples]
        width = max(len(p) + len(c) for p, c in sequences)
        input_ids = torch.full((len(examples), width), pad, dtype=torch.long)  # (B, T)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
        for row, (prefix, caption) in enumerate(sequences):
            n = len(prefix) + len(caption)
            input_ids[row, :n] = torch.tensor(prefix + caption)
            labels[row, len(prefix) : n] = torch.tensor(caption)
            mask[row, :n] = 1
        pixels = torch.stack([e["pixel_values"] for e in examples])  # (B, C, H, W)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        ).logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
        return nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    @torch.no_grad()
    def caption(self, model: nn.Module, examples: list[dict[str, Any]], args: Any, device: Any) -> list[str]:
        captions = []
        for example in examples:  # one at a time: prompts may differ in length
            ids = torch.tensor([self._prefix(example)], device=device)
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=example["pixel_values"][None].to(device),
                max_new_tokens=min(args.max_new_tokens, 32), do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
            )  # fmt: skip
            captions.append(self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
        return captions

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData, args: Any, device: Any) -> dict[str, float] | None:
        from deltatune.train.evaluate import mean_rouge_l

        if not data.val:
            return None
        was_training = model.training
        model.eval()
        loss, count = 0.0, 0
        for chunk in batched(data.val, max(args.batch_size, 8)):
            batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
            loss += float(self.loss_sum(model, batch))
            count += self.units(batch)
        scored = data.val[:ROUGE_ROWS]
        rouge = mean_rouge_l(self.caption(model, scored, args, device), [e["caption"] for e in scored])
        model.train(was_training)
        return {"rouge_l": rouge, "loss": loss / max(count, 1), "rouge_rows": len(scored)}

    def samples(self, model: nn.Module, data: TaskData, args: Any, device: Any) -> list[dict[str, str]]:
        rows = data.val[: args.num_samples]
        if not rows:
            return []
        was_training = model.training
        model.eval()
        outputs = self.caption(model, rows, args, device)
        model.train(was_training)
        return [{"prompt": "<image>", "reference": e["caption"], "output": o} for e, o in zip(rows, outputs)]

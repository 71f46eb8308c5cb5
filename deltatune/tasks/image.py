"""Images in, model-ready batches out: decode -> channels -> resize -> normalize -> stack.

A dataset row holds its image as a path, encoded bytes, a PIL image, an array or a tensor
(HxW, HxWxC or CxHxW; uint8 in [0, 255] or float in [0, 1]), or a `datasets` Image dict
({"bytes": ..., "path": ...}). Every image becomes a float tensor (C, H, W) normalized with the
model's mean and std.

An image that cannot be used (does not decode, has no pixels or an unsupported channel count,
holds NaN/inf, or has the wrong size when resizing is off) is dropped from its batch and counted
in an `ImageReport` by reason: one broken file never stops a training run, and the report says
how much was lost and where.
"""

from __future__ import annotations

import gzip
import io
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REASONS = ("decode", "shape", "size", "values", "label")
"""Why an image was dropped: cannot decode; unusable shape/channels; wrong size (resize off);
non-finite pixels; missing or non-integer label."""


class BadImage(ValueError):
    """This image cannot be used; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class ImageReport:
    """Running count of used and dropped images, by reason, with the first few examples."""

    seen: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def add_bad(self, where: Any, error: BadImage) -> None:
        self.dropped[error.reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{where}: {error}")

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        if not self.n_dropped:
            return f"images: {self.kept}/{self.seen} used"
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.dropped.items()))
        return f"images: {self.kept}/{self.seen} used, {self.n_dropped} dropped ({reasons}); e.g. {self.examples[0]}"


# -- decode ----------------------------------------------------------------------------------------
def _from_pil(source: Any) -> torch.Tensor:
    from PIL import Image

    try:
        image = source if isinstance(source, Image.Image) else Image.open(source)
        image.load()
        mode = "L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGBA" if "A" in image.mode else "RGB"
        array = np.asarray(image.convert(mode))
    except (OSError, ValueError, SyntaxError) as error:  # PIL reports corrupt data with any of these
        raise BadImage("decode", f"{type(error).__name__}: {error}") from None
    return _from_array(array)


def _from_array(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    # np.array copies: arrays from PIL are read-only
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.array(array))
    if tensor.dtype == torch.bool or not (tensor.is_floating_point() or tensor.dtype == torch.uint8):
        if (
            tensor.dtype in (torch.int16, torch.int32, torch.int64)
            and tensor.numel()
            and 0 <= tensor.min()
            and tensor.max() <= 255
        ):
            tensor = tensor.to(torch.uint8)
        else:
            raise BadImage("shape", f"unsupported pixel dtype {tensor.dtype}")
    pixels = tensor.float() / 255 if tensor.dtype == torch.uint8 else tensor.float()
    if pixels.dim() == 2:
        pixels = pixels.unsqueeze(0)  # (1, H, W)
    elif pixels.dim() == 3:
        if pixels.shape[0] not in (1, 3, 4) and pixels.shape[-1] in (1, 3, 4):
            pixels = pixels.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
        elif pixels.shape[0] not in (1, 3, 4):
            raise BadImage("shape", f"cannot tell the channel axis of shape {tuple(pixels.shape)}")
    else:
        raise BadImage("shape", f"expected 2 or 3 dimensions, got shape {tuple(pixels.shape)}")
    if pixels.shape[1] == 0 or pixels.shape[2] == 0:
        raise BadImage("shape", f"image has no pixels (shape {tuple(pixels.shape)})")
    return pixels.contiguous()


def decode_image(source: Any) -> torch.Tensor:
    """Any supported image source -> float tensor (C, H, W), C in {1, 3, 4}. Raises BadImage."""
    from PIL import Image

    if isinstance(source, dict):
        if source.get("bytes") is not None:
            return decode_image(source["bytes"])
        if source.get("path") is not None:
            return decode_image(source["path"])
        raise BadImage("decode", f"image dict without 'bytes' or 'path' (keys {sorted(source)})")
    if isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise BadImage("decode", f"no such file {str(source)!r}")
        return _from_pil(source)
    if isinstance(source, (bytes, bytearray)):
        return _from_pil(io.BytesIO(source))
    if isinstance(source, Image.Image):
        return _from_pil(source)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return _from_array(source)
    raise BadImage("decode", f"unsupported image type {type(source).__name__}")


# -- transform -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageTransform:
    """Decoded image -> (channels, *size) normalized tensor. Raises BadImage."""

    size: tuple[int, int]
    """Output (height, width)."""
    channels: int = 3
    """Output channels: 1 (grey) or 3 (RGB); grey input is repeated, alpha is dropped."""
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    resize: bool = True
    """Resize to `size` (bilinear, antialiased); False refuses images of another size."""

    def __call__(self, source: Any) -> torch.Tensor:
        pixels = decode_image(source)  # (C, H, W)
        if not torch.isfinite(pixels).all():
            raise BadImage("values", "image holds NaN or inf")
        pixels = self._to_channels(pixels)
        if tuple(pixels.shape[1:]) != tuple(self.size):
            if not self.resize:
                raise BadImage("size", f"image is {tuple(pixels.shape[1:])}, expected {tuple(self.size)}")
            batch = F.interpolate(pixels[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)
            pixels = batch[0]  # (C, *size)
        mean = torch.tensor(self.mean, dtype=pixels.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype).view(-1, 1, 1)
        return (pixels - mean) / std  # (channels, H, W)

    def _to_channels(self, pixels: torch.Tensor) -> torch.Tensor:
        channels = pixels.shape[0]
        if channels == 4:
            pixels, channels = pixels[:3], 3
        if channels == self.channels:
            return pixels
        if channels == 1 and self.channels == 3:
            return pixels.expand(3, -1, -1)
        if channels == 3 and self.channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=pixels.dtype).view(3, 1, 1)
            return (pixels * weights).sum(0, keepdim=True)
        raise BadImage("shape", f"cannot turn {channels} channels into {self.channels}")


# -- batching --------------------------------------------------------------------------------------
@dataclass
class ImageClassificationCollator:
    """Rows {"image": ..., "label": int} -> {"pixel_values": (B, C, H, W), "labels": (B,)}.

    Unusable rows are dropped and counted in `report`; a batch with no usable row gives None
    (skip it). `kept` in the result lists the positions of the rows that were used."""

    transform: ImageTransform
    image_key: str = "image"
    label_key: str | None = "label"
    report: ImageReport = field(default_factory=ImageReport)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
        pixels, labels, kept = [], [], []
        for position, row in enumerate(rows):
            self.report.seen += 1
            try:
                image = self.transform(row.get(self.image_key))
                label = _label(row, self.label_key)
            except BadImage as error:
                self.report.add_bad(row.get("id", position), error)
                continue
            pixels.append(image)
            labels.append(label)
            kept.append(position)
        self.report.kept += len(kept)
        if not kept:
            return None
        batch: dict[str, Any] = {"pixel_values": torch.stack(pixels), "kept": kept}  # (B, C, H, W)
        if self.label_key is not None:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)  # (B,)
        return batch


def _label(row: dict[str, Any], key: str | None) -> int | None:
    if key is None:
        return None
    value = row.get(key)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif isinstance(value, (np.ndarray, np.generic)) and value.size == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise BadImage("label", f"label {value!r} is not an integer class index >= 0")
    return int(value)


def batches(rows: Sequence[dict[str, Any]], collate: ImageClassificationCollator, batch_size: int) -> Iterable[dict]:
    """Consecutive batches of `rows`, skipping batches with no usable image."""
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size])
        if batch is not None:
            yield batch


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, batches: Iterable[dict[str, Any]]) -> float:
    """Top-1 accuracy of `model(pixel_values)` (its `.logits`, or the tensor it returns)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in batches:
        out = model(batch["pixel_values"])  # positional: HF image models and plain nn.Modules alike
        logits = getattr(out, "logits", out)  # (B, classes)
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        total += len(batch["labels"])
    model.train(was_training)
    return correct / max(total, 1)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST / Fashion-MNIST format, optionally .gz) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    dtype, ndim = dtypes[data[2]], data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)

"""Image-classification rows: IDX files in, rows that `deltatune.tasks.image` can batch out.

Canonical image-classification row: {"image": uint8 numpy array (H, W) or (H, W, C) with C in
{1, 3, 4}, "label": int >= 0}. `deltatune.tasks.image.ImageClassificationCollator` guesses the
channel axis of a 3-D array (an (H, W, C) image whose height is 1, 3 or 4 would be read as
(C, H, W)), so `task_rows` hands it channel-first views and `image_collator` does that per batch.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deltatune.data.report import DataError

# IDX type byte -> numpy dtype (big-endian for the multi-byte ones).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format; gzip when the name ends in .gz).

    Layout: two zero bytes, a type byte, the number of dimensions, one big-endian uint32 per
    dimension, then the values in C order.

    Raises:
        DataError: not IDX (bad magic), unknown type byte, or a data size that does not match
            the header (a truncated download).
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError; EOFError = cut-off gzip
        raise DataError(f"{path}: cannot read IDX file: {type(err).__name__}: {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX type byte 0x{data[2]:02x}")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"{path}: IDX header cut short ({len(data)} bytes for {ndim} dimensions)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file has {len(data)} bytes")
    array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    return array.astype(array.dtype.newbyteorder("="), copy=False)  # native byte order


def task_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Canonical image rows -> rows for `deltatune.tasks.image` (3-D images as (C, H, W) views).

    2-D images pass unchanged; no pixel is copied. Other keys are kept.
    """
    out = []
    for row in rows:
        image = row.get("image")
        if isinstance(image, np.ndarray) and image.ndim == 3:
            row = {**row, "image": image.transpose(2, 0, 1)}  # (H, W, C) -> (C, H, W)
        out.append(dict(row))
    return out


def image_collator(size: tuple[int, int], *, channels: int = 3, **transform_options: Any):
    """A `tasks.image` batch collator for canonical image rows.

    Returns a callable rows -> {"pixel_values": (B, channels, *size), "labels": (B,), "kept": [...]}
    or None, with the `ImageReport` of dropped images as its `.report`. `transform_options`
    (mean, std, resize) go to `ImageTransform`.
    """
    from deltatune.tasks.image import ImageClassificationCollator, ImageTransform  # torch: lazy

    collator = ImageClassificationCollator(ImageTransform(size=tuple(size), channels=channels, **transform_options))

    def collate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
        return collator(task_rows(rows))

    collate.report = collator.report  # type: ignore[attr-defined]
    collate.collator = collator  # type: ignore[attr-defined]
    return collate

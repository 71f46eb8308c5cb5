"""Image decoding, transforms and batching: every kind of bad image is counted, none raises."""

import gzip
import io

import numpy as np
import pytest
import torch
from PIL import Image

from deltatune.tasks.image import (
    BadImage,
    ImageClassificationCollator,
    ImageTransform,
    batches,
    decode_image,
    evaluate_accuracy,
    read_idx,
)

GREY = ImageTransform((8, 8), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_source_kind_decodes_to_the_same_pixels(tmp_path):
    array = np.random.default_rng(0).integers(0, 255, (6, 5, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(_png(array))
    expected = torch.from_numpy(array).permute(2, 0, 1).float() / 255  # (3, 6, 5)
    sources = [
        array,
        torch.from_numpy(array),
        _png(array),
        str(path),
        path,
        Image.fromarray(array),
        {"bytes": _png(array)},
    ]
    for source in sources:
        torch.testing.assert_close(decode_image(source), expected, atol=1e-6, rtol=0)
    chw = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(decode_image(chw), expected)


def test_transform_resizes_converts_channels_and_normalizes():
    grey = np.full((4, 4), 255, dtype=np.uint8)
    out = GREY(grey)
    assert out.shape == (3, 8, 8)
    torch.testing.assert_close(out, torch.ones(3, 8, 8))  # (1 - 0.5) / 0.5
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    assert GREY(rgba).shape == (3, 8, 8)
    to_grey = ImageTransform((8, 8), channels=1, mean=(0.0,), std=(1.0,))
    torch.testing.assert_close(to_grey(np.full((8, 8, 3), 255, dtype=np.uint8)), torch.ones(1, 8, 8), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (b"not a png at all", "decode"),
        ("/nonexistent/image.png", "decode"),
        (object(), "decode"),
        (np.zeros((2, 3, 4, 5), dtype=np.uint8), "shape"),
        (np.zeros((0, 4), dtype=np.uint8), "shape"),
        (np.zeros((7, 7, 7), dtype=np.uint8), "shape"),
        (np.zeros((8, 8, 2), dtype=np.uint8), "shape"),
        (np.full((8, 8), np.nan, dtype=np.float32), "values"),
    ],
)
def test_bad_images_raise_bad_image_with_reason(source, reason):
    with pytest.raises(BadImage) as caught:
        GREY(source)
    assert caught.value.reason == reason


def test_wrong_size_is_bad_only_when_resize_is_off():
    strict = ImageTransform((8, 8), resize=False)
    assert strict(np.zeros((8, 8, 3), dtype=np.uint8)).shape == (3, 8, 8)
    with pytest.raises(BadImage, match="size"):
        strict(np.zeros((9, 8, 3), dtype=np.uint8))


def test_collator_drops_and_counts_bad_rows_and_keeps_the_good_ones():
    good = np.full((8, 8), 128, dtype=np.uint8)
    rows = [
        {"image": good, "label": 1},
        {"image": b"corrupt", "label": 0, "id": "broken.jpg"},
        {"image": good, "label": "cat"},
        {"image": np.full((8, 8), np.inf, dtype=np.float32), "label": 2},
        {"image": good, "label": np.int64(2)},
        {"image": good, "label": torch.tensor(0)},
    ]
    collate = ImageClassificationCollator(GREY)
    batch = collate(rows)
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["labels"].tolist() == [1, 2, 0] and batch["kept"] == [0, 4, 5]
    report = collate.report
    assert (report.seen, report.kept, report.n_dropped) == (6, 3, 3)
    assert dict(report.dropped) == {"decode": 1, "label": 1, "values": 1}
    assert "broken.jpg" in report.examples[0] and "3 dropped" in report.summary()
    assert collate([{"image": b"x", "label": 0}]) is None  # nothing usable: skip, no crash
    assert list(batches([{"image": b"x", "label": 0}] * 3, collate, 2)) == []


def test_read_idx_reads_gzip_and_plain(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape)
    (tmp_path / "x.idx").write_bytes(header + images.tobytes())
    with gzip.open(tmp_path / "x.idx.gz", "wb") as handle:
        handle.write(header + images.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "x.idx"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.idx.gz"), images)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(tmp_path / "bad")


def test_evaluate_accuracy_counts_argmax_hits():
    class Fixed(torch.nn.Module):
        def forward(self, pixel_values):
            return pixel_values.flatten(1)[:, :3]  # (B, 3)

    pixel_values = torch.zeros(4, 3, 1, 1)
    pixel_values[0, 0] = pixel_values[1, 1] = pixel_values[2, 2] = pixel_values[3, 0] = 1
    batch = {"pixel_values": pixel_values, "labels": torch.tensor([0, 1, 2, 2])}
    assert evaluate_accuracy(Fixed(), [batch]) == 0.75

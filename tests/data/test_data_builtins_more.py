"""Offline built-ins added in issue 6: digits, fashion-mnist (idx files), vader-sentiment (sdist),
the image-classification row form and its validation, and the tasks.image adapter."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from deltatune.data import DataError, DatasetSpec, get_dataset_spec, list_datasets, load_rows
from deltatune.data.builtin import FASHION_MNIST_DIR, vader_label
from deltatune.data.images import image_collator, read_idx

FASHION_HINT = "apt-get install -y dataset-fashion-mnist"


def _write_idx(path: Path, array: np.ndarray, *, type_byte: int = 0x08) -> Path:
    header = bytes([0, 0, type_byte, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _fake_fashion(root: Path, n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    images = np.arange(n * 28 * 28, dtype=np.int64).reshape(n, 28, 28).astype(np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    _write_idx(root / "train-images-idx3-ubyte.gz", images)
    _write_idx(root / "train-labels-idx1-ubyte.gz", labels)
    _write_idx(root / "t10k-images-idx3-ubyte", images[:2])  # plain (not gzip) files work too
    _write_idx(root / "t10k-labels-idx1-ubyte", labels[:2])
    return images, labels


# -- catalogue ---------------------------------------------------------------------------------
def test_new_entries_are_offline_builtins_with_licenses():
    offline = {spec.name for spec in list_datasets(offline_only=True)}
    assert {"digits", "fashion-mnist", "vader-sentiment"} <= offline
    assert get_dataset_spec("digits").format == "image-classification"
    assert "BSD-3" in get_dataset_spec("digits").license
    assert "MIT" in get_dataset_spec("fashion-mnist").license and "Zalando" in get_dataset_spec("fashion-mnist").license
    assert get_dataset_spec("fashion-mnist").requires == FASHION_HINT
    assert "vaderSentiment==3.3.2" in get_dataset_spec("vader-sentiment").requires


# -- digits ------------------------------------------------------------------------------------
def test_digits_loads_all_rows_and_samples_deterministically():
    pytest.importorskip("sklearn")
    rows, report = load_rows("digits")
    assert len(rows) == 1797 and report.kept == 1797 and report.bad == 0
    first = rows[0]
    assert first["image"].dtype == np.uint8 and first["image"].shape == (8, 8)
    assert first["label"] == 0 and max(int(row["image"].max()) for row in rows) == 255  # 16 -> 255
    assert sorted({row["label"] for row in rows}) == list(range(10))

    a, rep = load_rows("digits#100", seed=3)
    b, _ = load_rows("digits#100", seed=3)
    c, _ = load_rows("digits#100", seed=4)
    assert len(a) == 100 and "sampled 100 of 1797 valid rows" in rep.summary()
    assert [r["label"] for r in a] == [r["label"] for r in b]
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


def test_digits_rows_collate_with_tasks_image():
    pytest.importorskip("sklearn")
    rows, _ = load_rows("digits#16", seed=0)
    collate = image_collator((8, 8), channels=1, mean=(0.5,), std=(0.5,))
    batch = collate(rows)
    assert tuple(batch["pixel_values"].shape) == (16, 1, 8, 8)
    assert batch["labels"].tolist() == [r["label"] for r in rows]
    assert collate.report.kept == 16


def test_channel_last_images_with_small_height_collate_correctly():
    rows = [{"image": np.full((3, 5, 3), 255, np.uint8), "label": 1}]  # H=3 would look channel-first
    batch = image_collator((3, 5), channels=3, mean=(0, 0, 0), std=(1, 1, 1))(rows)
    assert tuple(batch["pixel_values"].shape) == (1, 3, 3, 5)
    assert float(batch["pixel_values"].min()) == 1.0


# -- image-classification validation -----------------------------------------------------------
def test_image_rows_are_validated_by_reason():
    good = np.zeros((4, 4), np.uint8)
    raw = [
        ({"image": good, "label": 1}, "r0"),
        ({"image": good, "label": np.int64(2)}, "r1"),
        ({"image": np.zeros((4, 4, 3), np.uint8), "label": 0}, "r2"),
        ({"image": np.zeros((4,), np.uint8), "label": 1}, "r3"),  # 1-D
        ({"image": np.zeros((4, 4, 2), np.uint8), "label": 1}, "r4"),  # 2 channels
        ({"image": good, "label": "cat"}, "r5"),
        ({"image": good, "label": 1.0}, "r6"),
        ({"image": good, "label": True}, "r7"),
        ({"image": good.astype(np.float32), "label": 1}, "r8"),
        ({"image": good, "label": 12}, "r9"),  # outside the 10 class names
    ]
    from deltatune.data import builtin

    spec = DatasetSpec(
        name="fake-images", format="image-classification", builtin="fake_images", offline=True,
        options={"labels": [str(i) for i in range(10)]},
    )  # fmt: skip
    builtin.BUILTINS["fake_images"] = lambda options: (raw, [])
    try:
        rows, report = load_rows("fake-images", catalog={"fake-images": spec}, max_bad_fraction=0.9)
    finally:
        del builtin.BUILTINS["fake_images"]
    assert len(rows) == 3 and isinstance(rows[1]["label"], int)
    assert report.reasons == {"wrong_shape": 2, "wrong_type": 4, "bad_label": 1}
    assert "r3" in report.summary() and "r5" in report.summary()


# -- fashion-mnist ----------------------------------------------------------------------------
def test_read_idx_reads_fake_files_and_rejects_broken_ones(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 7)).astype(np.uint8)
    np.testing.assert_array_equal(read_idx(_write_idx(tmp_path / "x.gz", images)), images)
    ints = np.array([[1, -2], [300000, 4]], dtype=np.int32)
    back = read_idx(_write_idx(tmp_path / "i.idx", ints, type_byte=0x0C))
    np.testing.assert_array_equal(back, ints)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "cut").write_bytes((tmp_path / "i.idx").read_bytes()[:-3])
    with pytest.raises(DataError, match="bytes"):
        read_idx(tmp_path / "cut")


def test_fashion_mnist_from_a_fake_folder(tmp_path, monkeypatch):
    images, labels = _fake_fashion(tmp_path)
    monkeypatch.setenv("DELTATUNE_FASHION_MNIST_DIR", str(tmp_path))
    rows, report = load_rows("fashion-mnist")
    assert len(rows) == 8 and report.bad == 0
    np.testing.assert_array_equal(rows[5]["image"], images[5])
    assert [r["label"] for r in rows] == labels.tolist() + labels[:2].tolist()
    sampled, _ = load_rows("fashion-mnist#3", seed=0)
    assert len(sampled) == 3


def test_fashion_mnist_missing_folder_names_the_apt_package(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=FASHION_HINT):
        load_rows("fashion-mnist")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("DELTATUNE_FASHION_MNIST_DIR", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_rows("fashion-mnist")


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason=f"Fashion-MNIST not installed: {FASHION_HINT}")
def test_fashion_mnist_real_files(monkeypatch):
    monkeypatch.delenv("DELTATUNE_FASHION_MNIST_DIR", raising=False)
    rows, report = load_rows("fashion-mnist#200", seed=0)
    assert report.total == 70000 and report.kept == 70000 and len(rows) == 200
    assert all(r["image"].shape == (28, 28) and r["image"].dtype == np.uint8 for r in rows)
    assert {r["label"] for r in rows} <= set(range(10))


# -- vader-sentiment --------------------------------------------------------------------------
_VADER_LINES = {
    "movieReviewSnippets_GroundTruth.txt": ["1\t2.27\tA splendid film.", "2\t-1.9\tDreadful.", "3\t0.1\tIt exists."],
    "tweets_GroundTruth.txt": ["1\t0.5\tok good @anonymous", "2\t-0.5\tmeh bad", "3\tnot-a-number\tbroken"],
    "nytEditorialSnippets_GroundTruth.txt": ["1_1\t0.4\tOn Dec. 19, around noon."],
    "amazonReviewSnippets_GroundTruth.txt": ["1_1\t-0.9\ttroubleshooting ad-2500", "1_2\t3.0\tcaf\udcff great"],
}


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _fake_vader_sdist(folder: Path) -> Path:
    """vaderSentiment-3.3.2.tar.gz in the real layout, holding our own few CRLF lines."""
    inner = {
        f"hutto_ICWSM_2014/{name}": "\r\n".join(lines).encode("utf-8", errors="surrogateescape")  # a stray 0xff byte
        for name, lines in _VADER_LINES.items()
    }
    sdist = {
        "vaderSentiment-3.3.2/setup.py": b"",
        "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": _tar_bytes(inner),
    }
    path = folder / "vaderSentiment-3.3.2.tar.gz"
    path.write_bytes(_tar_bytes(sdist))
    return path


def test_vader_label_thresholds():
    assert [vader_label(m) for m in (0.5, 0.49, 0.0, -0.49, -0.5, 3.2)] == [
        "positive", "neutral", "neutral", "neutral", "negative", "positive",
    ]  # fmt: skip


def test_vader_reads_a_fake_sdist(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_VADER_SDIST", str(_fake_vader_sdist(tmp_path)))
    rows, report = load_rows("vader-sentiment")
    assert len(rows) == 8
    assert rows[0] == {"text": "A splendid film.", "label": "positive", "domain": "movie-reviews"}
    assert [r["label"] for r in rows] == [
        "positive", "negative", "neutral", "positive", "negative", "neutral", "negative", "positive",
    ]  # fmt: skip
    assert [r["domain"] for r in rows].count("tweets") == 2
    assert rows[-1]["text"] == "caf\ufffd great"  # errors="replace"
    assert "tweets_GroundTruth.txt:3" in report.summary()  # the malformed line is reported
    # the folder pip downloaded into works as well
    monkeypatch.setenv("DELTATUNE_VADER_SDIST", str(tmp_path))
    assert len(load_rows("vader-sentiment#5", seed=0)[0]) == 5


def test_vader_without_the_sdist_gives_the_fetch_command(tmp_path, monkeypatch):
    fetch = "pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d"
    monkeypatch.delenv("DELTATUNE_VADER_SDIST", raising=False)
    with pytest.raises(DataError, match="DELTATUNE_VADER_SDIST") as err:
        load_rows("vader-sentiment")
    assert fetch in str(err.value)
    monkeypatch.setenv("DELTATUNE_VADER_SDIST", str(tmp_path / "missing.tar.gz"))
    with pytest.raises(DataError, match="no such file"):
        load_rows("vader-sentiment")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    monkeypatch.setenv("DELTATUNE_VADER_SDIST", str(tmp_path / "junk.tar.gz"))
    with pytest.raises(DataError, match="not a readable tar.gz"):
        load_rows("vader-sentiment")


def test_image_and_text_rows_do_not_mix(tmp_path, monkeypatch):
    _fake_fashion(tmp_path)
    monkeypatch.setenv("DELTATUNE_FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setenv("DELTATUNE_VADER_SDIST", str(_fake_vader_sdist(tmp_path)))
    with pytest.raises(DataError, match="cannot mix"):
        load_rows("fashion-mnist,vader-sentiment")

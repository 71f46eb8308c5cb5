"""Batch tokenized examples: right-padding collation and optional sequence packing.

Padding is masked by position: padded positions get attention_mask 0 and label -100 whatever
the pad id is, so a tokenizer whose pad token is its EOS token (common: many causal LMs have no
pad token) still trains on its real EOS tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from deltatune.data.tokenization import IGNORE_INDEX


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (safe because masking never compares ids).

    Raises:
        ValueError: the tokenizer has neither.
    """
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("tokenizer has no pad or eos token; set tokenizer.pad_token first")


def collate(
    batch: Sequence[Mapping[str, Any]],
    pad_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Right-pad a list of examples into tensors.

    Sequence fields (input_ids, attention_mask, labels, position_ids) are padded to the longest
    example; labels of padded positions are -100 and attention_mask 0. A scalar `labels`
    (classification) becomes a (B,) tensor.

    Returns:
        dict of torch.LongTensor: input_ids/attention_mask/labels (B, T), position_ids (B, T)
        when present.
    """
    import torch  # lazy: loading and validating data needs no torch

    if not batch:
        raise ValueError("cannot collate an empty batch")
    longest = max(len(example["input_ids"]) for example in batch)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX, "position_ids": 0}
    out: dict[str, Any] = {}
    for key, value in fill.items():
        if key not in batch[0]:
            continue
        if key == "labels" and not isinstance(batch[0]["labels"], (list, tuple)):
            out[key] = torch.tensor([int(example["labels"]) for example in batch], dtype=torch.long)  # (B,)
            continue
        rows = [list(example[key]) + [value] * (longest - len(example[key])) for example in batch]
        out[key] = torch.tensor(rows, dtype=torch.long)  # (B, T)
    if "attention_mask" not in out:
        lengths = torch.tensor([len(example["input_ids"]) for example in batch])
        out["attention_mask"] = (torch.arange(longest)[None, :] < lengths[:, None]).long()  # (B, T)
    return out


def pack(examples: Sequence[Mapping[str, Sequence[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Concatenate examples, in order, into sequences of at most max_length tokens.

    Greedy: an example goes into the current pack if it fits, else starts a new one (examples
    are never split, so no answer loses its EOS). Each pack carries position_ids restarting at
    0 per example, and the first label of every example is -100 so no token is trained to
    predict across an example boundary. Attention still spans the whole pack unless the model
    derives per-example attention from position_ids (flash-attention varlen paths do).

    Raises:
        ValueError: an example is longer than max_length.
    """
    packs: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "attention_mask": [], "position_ids": []}
    for i, example in enumerate(examples):
        n = len(example["input_ids"])
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens > max_length={max_length}; truncate first")
        if current["input_ids"] and len(current["input_ids"]) + n > max_length:
            packs.append(current)
            current = {key: [] for key in current}
        current["input_ids"] += list(example["input_ids"])
        current["labels"] += [IGNORE_INDEX] + list(example["labels"][1:])
        current["attention_mask"] += [1] * n
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        packs.append(current)
    return packs

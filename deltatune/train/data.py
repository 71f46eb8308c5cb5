"""Training data as a pure function of the step: no iterator state to save.

Each epoch shuffles the training examples with a generator seeded by (seed, epoch). An optimizer
step consumes `global_batch = batch_size * grad_accum * world_size` examples in permutation order
(the last partial global batch of an epoch is dropped), so the cursor of step s is
(epoch = s // steps_per_epoch, position = (s % steps_per_epoch) * global_batch), O(1) to restore.

With `group_by_length`, each window of GROUP_WINDOW global batches of the shuffled order is sorted
by length (longest first) before it is cut into global batches, and the batches of the epoch are
then shuffled again: rows of similar length share a batch, so right-padding wastes little compute,
and the stream is still a pure function of (seed, epoch).

With `split_by_length`, each micro-batch is sorted by length and cut in two where padding is
smallest (see `_split_by_length`): the same rows and the same update, less padded compute.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from deltatune.data import DataError, collate


@dataclass(frozen=True)
class Cursor:
    epoch: int
    position: int
    permutation_seed: int


GROUP_WINDOW = 16
"""Global batches per window sorted by length when grouping (wider: less padding, less mixing)."""


class StepData:
    """Micro-batches of each optimizer step, for one process of `world_size`."""

    def __init__(self, examples: list[dict[str, Any]], *, batch_size: int, grad_accum: int, seed: int,
                 pad_id: int = 0, world_size: int = 1, rank: int = 0, group_by_length: bool = False,
                 split_by_length: bool = False, collate_fn: Callable[[list], dict] | None = None,
                 length: Callable[[dict], int] | None = None):  # fmt: skip
        """`collate_fn` batches examples (default: right-padded token ids with `pad_id`); `length`
        gives an example's length (default: its input_ids); without lengths (length=None and no
        input_ids) the length options are off."""
        self.examples = examples
        self.collate_fn = collate_fn or (lambda rows: collate(rows, self.pad_id))
        has_ids = bool(examples) and isinstance(examples[0].get("input_ids"), list)
        self.length = length or ((lambda e: len(e["input_ids"])) if has_ids else None)
        if self.length is None:
            group_by_length = split_by_length = False
        self.group_by_length, self.split_by_length = group_by_length, split_by_length
        self.batch_size, self.grad_accum, self.seed, self.pad_id = batch_size, grad_accum, seed, pad_id
        self.world_size, self.rank = world_size, rank
        self.global_batch = batch_size * grad_accum * world_size
        self.steps_per_epoch = len(examples) // self.global_batch
        if self.steps_per_epoch < 1:
            raise DataError(
                f"{len(examples)} training rows are fewer than one global batch ({self.global_batch} = batch_size "
                f"{batch_size} x grad_accum {grad_accum} x {world_size} processes); use more data or a smaller batch"
            )
        self._perm_epoch = -1
        self._perm: list[int] = []

    def cursor(self, step: int) -> Cursor:
        """Where step `step` (0-based) starts reading."""
        return Cursor(step // self.steps_per_epoch, (step % self.steps_per_epoch) * self.global_batch, self.seed)

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(len(self.examples), generator=gen).tolist()
            self._perm = self._grouped(perm, gen) if self.group_by_length else perm
            self._perm_epoch = epoch
        return self._perm

    def _grouped(self, perm: list[int], gen: torch.Generator) -> list[int]:
        size = self.global_batch
        used = self.steps_per_epoch * size  # the dropped tail stays at the end
        window = size * GROUP_WINDOW
        ordered: list[int] = []
        for start in range(0, used, window):
            part = perm[start : min(start + window, used)]
            part.sort(key=lambda i: -self.length(self.examples[i]))  # stable: ties keep the random order
            ordered += part
        batches = [ordered[i : i + size] for i in range(0, used, size)]
        return [i for b in torch.randperm(len(batches), generator=gen).tolist() for i in batches[b]] + perm[used:]

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This process's grad_accum micro-batches of step `step`, collated."""
        cursor = self.cursor(step)
        order = self._permutation(cursor.epoch)[cursor.position : cursor.position + self.global_batch]
        out = []
        for micro in range(self.grad_accum):
            # Micro-batch k of every process is a contiguous slice, so k x b on one process and
            # one process per slice read the same rows in the same order.
            start = (micro * self.world_size + self.rank) * self.batch_size
            rows = [self.examples[i] for i in order[start : start + self.batch_size]]
            if self.split_by_length and len(rows) > 1:
                out += [self.collate_fn(part) for part in _split_by_length(rows, self.length)]
            else:
                out.append(self.collate_fn(rows))
        return out


def _split_by_length(rows: list[dict[str, Any]], length: Callable[[dict], int] | None = None) -> tuple[list, list]:
    """The rows sorted by length, cut in two where the padded size of both halves is smallest.

    Always two parts, so every process of a multi-process run does the same number of backward
    passes. The loop normalises the loss over all tokens of the step, so the update is the same as
    for the uncut batch; only the padding, and the compute spent on it, shrinks. (Three parts
    measured no faster on the default run, four slower: smaller matmuls, more passes.)"""
    length = length or (lambda row: len(row["input_ids"]))
    ordered = sorted(rows, key=length)
    lengths = [length(row) for row in ordered]
    longest = lengths[-1]
    cut = min(range(1, len(ordered)), key=lambda k: k * lengths[k - 1] + (len(ordered) - k) * longest)
    return ordered[:cut], ordered[cut:]


def fingerprint(examples: list[dict[str, Any]], extra: dict[str, Any]) -> str:
    """sha256 over the examples (token ids and labels; tensors by their bytes) and the settings
    that define the data stream."""
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for example in examples:
        if isinstance(example.get("input_ids"), list) and isinstance(example.get("labels"), list):
            digest.update(json.dumps([example["input_ids"], example["labels"]]).encode())
            continue
        for key in sorted(example):
            value = example[key]
            digest.update(key.encode())
            if isinstance(value, torch.Tensor):
                digest.update(str((value.dtype, tuple(value.shape))).encode())
                digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            else:
                digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def split_rows(
    rows: list, val_size: float | None, seed: int, log: Callable[[str], None] | None = None
) -> tuple[list, list]:
    """(train rows, held-out rows) of a run, the same for every task.

    `val_size`: a count >= 1 or a fraction; 0 holds nothing out; None chooses for the data size
    (deltatune.data.loading.choose_val_size, which says what it chose through `log`).

    Raises:
        DataError: an explicit size that leaves no training rows.
    """
    from deltatune.data import train_val_split
    from deltatune.data.loading import choose_val_size

    size, note = choose_val_size(len(rows), val_size)
    if note and log is not None:
        log(note)
    if not size:
        return list(rows), []
    return train_val_split(rows, int(size) if size >= 1 else float(size), seed=seed)

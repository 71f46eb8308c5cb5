"""The training stream: a pure function of (seed, epoch); grouping by length cuts padding."""

from __future__ import annotations

import random

from deltatune.train import TrainArgs
from deltatune.train.data import StepData


def rows(count: int, seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        length = rng.randint(4, 96)
        out.append({"input_ids": [i] * length, "labels": [i] * length})
    return out


def row_ids(batch) -> list[int]:
    return [int(r[0]) for r in batch["input_ids"]]


def padded_tokens(data: StepData, steps: int) -> int:
    return sum(mb["input_ids"].numel() for step in range(steps) for mb in data.micro_batches(step))


def test_grouping_cuts_padding_and_keeps_every_row_once_per_epoch():
    examples = rows(1000)
    plain = StepData(examples, batch_size=8, grad_accum=1, seed=3, pad_id=0)
    grouped = StepData(examples, batch_size=8, grad_accum=1, seed=3, pad_id=0, group_by_length=True)
    steps = plain.steps_per_epoch
    assert padded_tokens(grouped, steps) < 0.7 * padded_tokens(plain, steps)
    seen = [i for step in range(steps) for mb in grouped.micro_batches(step) for i in row_ids(mb)]
    assert sorted(seen) == list(range(1000))  # 1000 = 125 x 8: nothing dropped, nothing twice


def test_grouped_stream_is_a_function_of_seed_and_epoch():
    examples = rows(200)
    first = StepData(examples, batch_size=4, grad_accum=2, seed=5, pad_id=0, group_by_length=True)
    again = StepData(examples, batch_size=4, grad_accum=2, seed=5, pad_id=0, group_by_length=True)
    epoch = first.steps_per_epoch
    for step in (0, 7, epoch - 1, epoch, epoch + 3):  # read out of order, as a resumed run does
        assert [row_ids(mb) for mb in first.micro_batches(step)] == [row_ids(mb) for mb in again.micro_batches(step)]
    assert row_ids(first.micro_batches(0)[0]) != row_ids(first.micro_batches(epoch)[0])  # epochs reshuffle
    other_seed = StepData(examples, batch_size=4, grad_accum=2, seed=6, pad_id=0, group_by_length=True)
    assert row_ids(other_seed.micro_batches(0)[0]) != row_ids(first.micro_batches(0)[0])


def test_one_process_with_accumulation_reads_what_two_processes_read():
    examples = rows(160)
    single = StepData(examples, batch_size=4, grad_accum=2, seed=1, pad_id=0, group_by_length=True)
    ranks = [StepData(examples, batch_size=4, grad_accum=1, seed=1, pad_id=0, world_size=2, rank=r, group_by_length=True)
             for r in (0, 1)]  # fmt: skip
    for step in range(single.steps_per_epoch):
        assert [row_ids(mb) for mb in single.micro_batches(step)] == [row_ids(p.micro_batches(step)[0]) for p in ranks]


def test_sft_groups_by_length_by_default():
    assert TrainArgs().group_by_length is True

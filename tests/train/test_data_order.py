"""The training stream: a pure function of (seed, epoch); grouping by length cuts padding."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from deltatune.train import TrainArgs, train
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


def test_sft_does_not_regroup_rows_unless_asked():
    assert TrainArgs().group_by_length is False


def test_split_by_length_keeps_the_rows_and_cuts_the_padding():
    examples = rows(64, seed=2)
    whole = StepData(examples, batch_size=8, grad_accum=2, seed=4, pad_id=0)
    split = StepData(examples, batch_size=8, grad_accum=2, seed=4, pad_id=0, split_by_length=True)
    for step in range(whole.steps_per_epoch):
        before, after = whole.micro_batches(step), split.micro_batches(step)
        assert len(after) == 2 * len(before)  # always two parts: equal backward counts across processes
        for k, mb in enumerate(before):
            halves = after[2 * k : 2 * k + 2]
            assert sorted(row_ids(mb)) == sorted(row_ids(halves[0]) + row_ids(halves[1]))
            assert sum(h["input_ids"].numel() for h in halves) <= mb["input_ids"].numel()
            labels = sum(int((h["labels"] != -100).sum()) for h in halves)
            assert labels == int((mb["labels"] != -100).sum())  # the same supervised tokens
    assert padded_tokens(split, whole.steps_per_epoch) < 0.85 * padded_tokens(whole, whole.steps_per_epoch)


def test_split_by_length_gives_the_same_update(tiny_assets, tmp_path):
    model_dir, data = tiny_assets
    adapters, losses = [], []
    for split in (False, True):
        out = tmp_path / f"split-{split}"
        args = TrainArgs(
            model=str(model_dir), dataset=str(data), output_dir=str(out), batch_size=8, max_length=32, val_size=16,
            num_samples=0, lr=1e-2, max_steps=3, progress=False, plot=False, split_by_length=split,
            tuner_args={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        )  # fmt: skip
        losses.append(train(args, log=lambda *_: None).losses)
        adapters.append(load_file(str(out / "adapter" / "adapter_model.safetensors")))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    for key in adapters[0]:
        assert adapters[0][key].abs().max() > 0 or "lora_B" not in key
        assert torch.allclose(adapters[0][key], adapters[1][key], rtol=1e-4, atol=1e-6)


def test_sft_splits_by_length_by_default():
    assert TrainArgs().split_by_length is True

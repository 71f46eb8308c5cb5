"""What a first user hits with their own data: small files, rejected files, chats ending on the user."""

from __future__ import annotations

import json

from train_helpers import synthetic_rows

from deltatune.cli.main import main
from deltatune.data.loading import choose_val_size, train_val_split


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _sft(model_dir, data, out, *extra):
    return [
        "sft", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out), "--batch-size", "4",
        "--max-length", "32", "--num-samples", "0", "--max-steps", "1", "--save-steps", "1",
        "--tuner-args", "r=2,target_modules=[q_proj]", *extra,
    ]  # fmt: skip


def test_small_data_trains_with_the_default_split_and_says_what_it_chose(tiny_assets, tmp_path, capsys):
    model_dir, _ = tiny_assets
    data = _write(tmp_path / "small.jsonl", synthetic_rows(80))
    assert main(_sft(model_dir, data, tmp_path / "run")) == 0
    out = capsys.readouterr().out
    assert "held-out split: 16 of 80 rows" in out
    assert "held-out loss before" in out  # the chosen rows are evaluated


def test_an_explicit_impossible_val_size_is_an_error(tiny_assets, tmp_path, capsys):
    model_dir, _ = tiny_assets
    data = _write(tmp_path / "small.jsonl", synthetic_rows(80))
    assert main(_sft(model_dir, data, tmp_path / "run", "--val-size", "80")) == 5
    err = capsys.readouterr().err
    assert "--val-size 80 leaves no training rows out of 80" in err


def test_default_split_sizes():
    assert choose_val_size(5000, None) == (200, None)
    assert choose_val_size(80, None)[0] == 16
    assert choose_val_size(4, None)[0] == 0
    assert choose_val_size(80, 0.5) == (0.5, None)
    assert len(train_val_split(list(range(80)), None)[1]) == 16

"""--report-to tensorboard: every train/eval record of logs.jsonl also lands in TensorBoard."""

from __future__ import annotations

import json

import pytest

from deltatune.core.config import ConfigError
from deltatune.train import TrainArgs, train

pytest.importorskip("tensorboard")


def test_tensorboard_gets_the_same_losses_as_the_jsonl_log(tiny_assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model_dir, data = tiny_assets
    out = tmp_path / "run"
    args = TrainArgs(
        model=str(model_dir), dataset=str(data), output_dir=str(out), batch_size=4, max_length=32, val_size=16,
        num_samples=0, lr=1e-2, max_steps=3, save_steps=3, progress=False, plot=False, report_to="tensorboard",
        tuner_args={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    )  # fmt: skip
    train(args, log=lambda *_: None)
    records = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under OUT/runs"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    losses = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    expected = [(r["step"], r["loss"]) for r in records if r["event"] == "train"]
    assert [s for s, _ in losses] == [s for s, _ in expected] == [1, 2, 3]
    assert [v for _, v in losses] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/loss")] == [0, 3]  # before and after


def test_an_uninstalled_tracker_is_refused_before_loading(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install wandb"):
        train(TrainArgs(output_dir=str(tmp_path / "x"), report_to="wandb"))
    assert not (tmp_path / "x").exists()

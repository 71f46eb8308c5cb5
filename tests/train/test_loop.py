"""The training loop from Python: loss normalization, guards, checkpoints, outputs."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import build_model, build_tokenizer, synthetic_rows

import deltatune as dt
from deltatune.data import collate, encode_rows
from deltatune.train import (
    DivergedError,
    GradientCheckError,
    OutputDirError,
    TrainArgs,
    train,
)
from deltatune.train import checkpoint as ckpt
from deltatune.train.evaluate import token_loss_sum
from deltatune.train.optim import build_optimizer, lr_factor
from deltatune.train.outdir import RunLock

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def tiny_args(model_dir: Path, data: Path, out: Path, **changes) -> TrainArgs:
    base = dict(
        model=str(model_dir), dataset=str(data), output_dir=str(out), tuner_args=dict(LORA), batch_size=4,
        max_length=32, val_size=16, num_samples=0, lr=1e-2, max_steps=4, save_steps=2, progress=False, plot=False,
    )  # fmt: skip
    base.update(changes)
    return TrainArgs(**base)


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_grad_accum_k_by_b_equals_one_batch_of_kb(tiny_assets, tmp_path):
    runs = {}
    for batch, accum in [(8, 1), (2, 4)]:
        out = tmp_path / f"b{batch}x{accum}"
        result = train(
            tiny_args(*tiny_assets, out, batch_size=batch, grad_accum=accum, max_steps=3, plot=False),
            log=lambda *_: None,
        )
        runs[(batch, accum)] = (result.losses, adapter_tensors(out))
    ref_losses, ref = runs[(8, 1)]
    assert any(v.abs().sum() > 0 for k, v in ref.items() if "lora_B" in k)
    for losses, tensors in runs.values():
        assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-6)
        for key in ref:
            torch.testing.assert_close(tensors[key], ref[key], rtol=1e-5, atol=1e-6)


def test_token_level_normalization_differs_from_mean_of_means():
    """Non-vacuity: micro-batches with different token counts weigh tokens, not batches, equally."""
    tokenizer = build_tokenizer()
    model = dt.get_tuned_model(build_model(len(tokenizer)), dt.LoraConfig(**LORA, init_lora_weights=False))
    examples, _ = encode_rows(tokenizer, synthetic_rows(8), max_length=32)
    short = sorted(examples, key=lambda e: sum(label != -100 for label in e["labels"]))
    halves = [collate(short[:4], 1), collate(short[4:], 1)]
    with torch.no_grad():
        sums, counts = zip(*(token_loss_sum(model, h) for h in halves))
        full_sum, full_count = token_loss_sum(model, collate(short, 1))
    assert counts[0] != counts[1]
    token_level = (sums[0] + sums[1]) / (counts[0] + counts[1])
    mean_of_means = (sums[0] / counts[0] + sums[1] / counts[1]) / 2
    torch.testing.assert_close(token_level, full_sum / full_count)
    # A random model's per-token loss is close to ln(vocab) everywhere, so the gap is small, but
    # two orders of magnitude above float32 noise at this scale (~1e-7).
    assert abs(float(mean_of_means - token_level)) > 1e-5


def test_gradient_checkpointing_keeps_adapter_gradients(tiny_assets, tmp_path):
    result = train(
        tiny_args(*tiny_assets, tmp_path / "gc", gradient_checkpointing=True, max_steps=3), log=lambda *_: None
    )
    tensors = adapter_tensors(tmp_path / "gc")
    assert result.steps == 3 and all(v.abs().sum() > 0 for v in tensors.values())  # A and B both moved


def test_unreached_trainable_tensor_fails_the_gradient_check(tiny_assets, tmp_path):
    tokenizer = build_tokenizer()
    tuned = dt.get_tuned_model(build_model(len(tokenizer)), dt.LoraConfig(**LORA))
    tuned.model.unused = torch.nn.Parameter(torch.ones(3))  # trainable but outside the forward
    with pytest.raises(GradientCheckError, match="unused"):
        train(tiny_args(*tiny_assets, tmp_path / "g"), model=tuned, tokenizer=tokenizer, log=lambda *_: None)


def test_repeated_nan_loss_stops_naming_the_steps_and_never_checkpoints_it(tiny_assets, tmp_path):
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer))
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    out = tmp_path / "nan"
    with pytest.raises(DivergedError, match=r"steps \[1, 2, 3\]"):
        train(
            tiny_args(*tiny_assets, out, max_steps=6, save_steps=1, val_size=0),
            model=model,
            tokenizer=tokenizer,
            log=lambda *_: None,
        )
    for folder in (out / "checkpoints").glob("step-*"):
        tensors = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
        assert all(torch.isfinite(v).all() for v in tensors.values())


def test_a_locked_output_dir_is_refused(tiny_assets, tmp_path):
    out = tmp_path / "locked"
    with RunLock(out):
        with pytest.raises(OutputDirError, match="in use by another run"):
            train(tiny_args(*tiny_assets, out), log=lambda *_: None)


def test_disk_full_during_save_keeps_the_previous_checkpoint(tiny_assets, tmp_path, monkeypatch):
    out = tmp_path / "full"
    real = ckpt.save_tensors
    calls = {"n": 0}

    def failing(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint's optimizer file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(ckpt, "save_tensors", failing)
    with pytest.raises(OSError, match="No space left"):
        train(tiny_args(*tiny_assets, out), log=lambda *_: None)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-2"]  # no half-written folder, none under a final name
    ckpt.verify(out / "checkpoints" / "step-2")


def test_checkpoint_holds_only_json_and_safetensors_and_round_trips(tiny_assets, tmp_path):
    out = tmp_path / "files"
    result = train(tiny_args(*tiny_assets, out, plot=True), log=lambda *_: None)
    folder = out / "checkpoints" / "step-4"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert all(f.endswith((".json", ".safetensors")) for f in files), files
    manifest = ckpt.verify(folder)
    assert manifest["step"] == 4 and set(manifest["files"]) == set(files) - {"manifest.json"}
    assert {"config_hash", "data_fingerprint", "versions"} <= set(manifest)
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["cursor"] == {"epoch": 0, "position": 16, "permutation_seed": 42}
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-4", "step-2"] or len(
        list((out / "checkpoints").iterdir())
    ) == 2
    assert (out / "loss.png").stat().st_size > 1000 and result.eval_after["loss"] < result.eval_before["loss"]
    # the final adapter loads strictly into a fresh base
    tokenizer = build_tokenizer()
    tuned = dt.TunedModel.from_pretrained(build_model(len(tokenizer)), out / "adapter")
    assert tuned.active_adapters == ["default"]


def test_optimizer_state_round_trips_through_json_and_safetensors():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = build_optimizer(
        [("a.lora_A.weight", params[0]), ("a.lora_B.weight", params[1])], lr=1e-2, weight_decay=0.0, loraplus_lr_ratio=4
    )
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 4e-2]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    tensors, meta = ckpt.optimizer_to_files(opt, ["a", "b"])
    json.dumps(meta)
    clone = build_optimizer(
        [("a.lora_A.weight", params[0]), ("a.lora_B.weight", params[1])], lr=1.0, weight_decay=0.0, loraplus_lr_ratio=4
    )
    ckpt.optimizer_from_files(clone, tensors, json.loads(json.dumps(meta)), ["a", "b"])
    for i in range(2):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(clone.state_dict()["state"][i][key], opt.state_dict()["state"][i][key])
    assert clone.param_groups[1]["lr"] == 4e-2


def test_optimizer_loops_per_tensor_off_the_gpu():
    """Fused AdamW only when every tensor is on a GPU; elsewhere the per-tensor loop (same kernels each run)."""
    opt = build_optimizer([("w", torch.nn.Parameter(torch.randn(3)))], lr=1e-3, weight_decay=0.0, loraplus_lr_ratio=None)
    assert opt.defaults["foreach"] is False and not opt.defaults["fused"]


def test_rng_state_round_trips():
    import random

    import numpy as np

    state = json.loads(json.dumps(ckpt.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1))
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_lr_schedule_shapes():
    assert [round(lr_factor(s, 10, 2, "cosine"), 3) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 0.038]
    assert lr_factor(5, 10, 0, "linear") == pytest.approx(0.5)
    assert lr_factor(7, 10, 0, "constant") == 1.0


def test_invalid_arguments_fail_before_loading(tmp_path):
    from deltatune.core.config import ConfigError

    with pytest.raises(ConfigError, match="valid fields"):
        train(TrainArgs(model="does/not-matter", tuner_args={"rank": 4}, output_dir=str(tmp_path / "x")))
    with pytest.raises(ConfigError, match="exactly one"):
        train(TrainArgs(num_epochs=1, output_dir=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()

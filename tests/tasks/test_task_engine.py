"""Every task runs on the one training engine with the same guarantees (tiny models from config).

Per task: a run that is stopped by SIGTERM after step 2 (the loop checkpoints and exits) and then
resumed ends with exactly the per-step losses and adapter tensors of an uninterrupted run; the
held-out metrics are written before and after; the adapter loads back. The SIGKILL variant runs
for causal-lm in tests/train/test_resume.py; the same restore path serves every task.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from task_assets import build_all

from deltatune.tasks.registry import get_task, task_names
from deltatune.train import Interrupted, TrainArgs, train

TASKS = [
    "causal-lm",
    "pretrain",
    "sequence-classification",
    "token-classification",
    "image-classification",
    "seq2seq",
    pytest.param("text-to-image", marks=pytest.mark.slow),
    pytest.param("image-to-text", marks=pytest.mark.slow),
]
NAMES = [t if isinstance(t, str) else t.values[0] for t in TASKS]
LORA = {"r": 4, "lora_alpha": 8}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("task-assets"))


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _args(task: str, assets, out, **changes) -> TrainArgs:
    model, dataset = assets[task]
    lm = task in ("causal-lm", "pretrain")
    tuner_args = dict(LORA, target_modules=["q_proj", "v_proj"]) if lm else dict(LORA)
    base = dict(task=task, model=model, dataset=dataset, output_dir=str(out), tuner_args=tuner_args, batch_size=4,
                max_length=32, val_size=16, num_samples=0, max_new_tokens=4, lr=1e-2, max_steps=4, save_steps=2, progress=False,
                plot=False)  # fmt: skip
    base.update(changes)
    return TrainArgs(**base)


def _losses(out) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["event"] == "train"]


def test_every_sft_task_is_registered():
    assert set(NAMES) <= set(task_names())
    for name in NAMES:
        assert get_task(name).name == name


@pytest.mark.parametrize("task", TASKS)
def test_sigterm_then_resume_is_bit_identical(task, assets, tmp_path, monkeypatch):
    straight = train(_args(task, assets, tmp_path / "straight"), log=lambda *_: None)
    assert straight.eval_before and straight.eval_after  # the task's held-out metrics, before and after
    reference = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in reference.items() if "lora_B" in k)

    out = tmp_path / "stopped"
    monkeypatch.setenv("DELTATUNE_FAULT", "term@after_step:2")
    with pytest.raises(Interrupted):
        train(_args(task, assets, out), log=lambda *_: None)
    monkeypatch.delenv("DELTATUNE_FAULT")
    resumed = train(_args(task, assets, out, resume=True), log=lambda *_: None)
    assert resumed.resumed_from == 2
    assert _losses(out) == _losses(tmp_path / "straight")  # exact floats, every step
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert tensors.keys() == reference.keys()
    for key in reference:
        assert torch.equal(tensors[key], reference[key]), key
    assert resumed.eval_after == straight.eval_after


def test_causal_lm_packing_resumes_and_packs(assets, tmp_path, monkeypatch):
    """--packing: fewer, fuller rows; the same exact-resume guarantee."""
    logs: list[str] = []
    straight = train(_args("causal-lm", assets, tmp_path / "straight", packing=True, max_length=64), log=logs.append)
    assert any(line.startswith("packing: ") for line in logs)
    out = tmp_path / "stopped"
    monkeypatch.setenv("DELTATUNE_FAULT", "term@after_step:2")
    with pytest.raises(Interrupted):
        train(_args("causal-lm", assets, out, packing=True, max_length=64), log=lambda *_: None)
    monkeypatch.delenv("DELTATUNE_FAULT")
    train(_args("causal-lm", assets, out, packing=True, max_length=64, resume=True), log=lambda *_: None)
    assert _losses(out) == _losses(tmp_path / "straight")
    assert straight.eval_after["loss"] < straight.eval_before["loss"]


@pytest.mark.parametrize("task", ["sequence-classification", "token-classification"])
def test_classifiers_learn_the_signal(task, assets, tmp_path):
    result = train(_args(task, assets, tmp_path / "run", max_steps=30, lr=3e-2), log=lambda *_: None)
    headline = next(iter(result.eval_after))
    assert headline in ("accuracy", "entity_f1")
    assert result.eval_after[headline] > result.eval_before[headline] + 0.2
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["task"] == task and saved["data"]["num_labels"] >= 2


def test_token_labels_go_on_the_first_subword_only(assets):
    from transformers import AutoTokenizer

    task = get_task("token-classification")
    tokenizer = AutoTokenizer.from_pretrained(assets["token-classification"][0])
    task.load_processor(None, print, given=tokenizer)
    args = TrainArgs(max_length=32)
    # "paris" is in the vocabulary; "zzz" splits into no known word -> one [UNK] sub-word
    (example,) = task._encode([{"tokens": ["alice", "paris", "the"], "tags": ["B-PER", "B-LOC", "O"]}],
                              {"O": 0, "B-LOC": 1, "B-PER": 2}, args)  # fmt: skip
    assert example["labels"] == [-100, 2, 1, 0, -100]  # [CLS] alice paris the [SEP]


def test_entity_f1_is_span_exact():
    from deltatune.tasks.encoders import entities, entity_f1

    assert entities(["B-PER", "I-PER", "O", "I-LOC", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    assert entity_f1(gold, gold)["entity_f1"] == 1.0
    half = entity_f1([["B-PER", "O", "O", "B-LOC"]], gold)  # PER span cut short: wrong; LOC right
    assert half["precision"] == 0.5 and half["recall"] == 0.5


@pytest.mark.slow
def test_text_to_image_writes_sample_pngs_and_a_diffusers_lora(assets, tmp_path):
    from PIL import Image

    out = tmp_path / "run"
    result = train(_args("text-to-image", assets, out, max_steps=2, num_samples=1), log=lambda *_: None)
    before, after = Image.open(out / "samples" / "before-0.png"), Image.open(out / "samples" / "after-0.png")
    assert before.size == after.size == (16, 16)
    assert result.samples[0]["before"].endswith("before-0.png")
    lora = load_file(str(out / "diffusers_lora" / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("unet.") and ".lora_" in k for k in lora)


def test_eval_command_reports_the_task_metrics_of_a_run(assets, tmp_path):
    from deltatune.cli.main import main

    out = tmp_path / "run"
    train(_args("sequence-classification", assets, out, max_steps=30, lr=3e-2), log=lambda *_: None)
    model, dataset = assets["sequence-classification"]
    scores = {}
    for name, extra in (("base", []), ("tuned", ["--adapter", str(out / "adapter")])):
        report = tmp_path / f"{name}.json"
        argv = ["eval", "--task", "sequence-classification", "--model", model, "--dataset", dataset,
                "--max-length", "32", "--output", str(report), *extra]  # fmt: skip
        assert main(argv) == 0
        scores[name] = json.loads(report.read_text())
    assert scores["tuned"]["rows"] == scores["base"]["rows"] == 64  # every row evaluated
    assert scores["tuned"]["accuracy"] > scores["base"]["accuracy"] + 0.2


@pytest.mark.slow
@pytest.mark.parametrize("task", ["image-classification"])  # causal-lm: tests/train/test_slow.py
def test_two_process_gloo_run_matches_one_process(task, assets, tmp_path):
    """DDP over 2 CPU processes (batch 2 each) reaches the adapter of 1 process with batch 4."""
    import os
    import subprocess
    import sys

    model, dataset = assets[task]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DELTATUNE_FAULT", None)
    runs = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        flags = ["sft", "--task", task, "--model", model, "--dataset", dataset, "--output-dir", str(out),
                 "--batch-size", str(4 // procs), "--max-steps", "3", "--val-size", "16", "--max-length", "32",
                 "--lr", "1e-2", "--tuner-args", "r=4,lora_alpha=8", "--num-samples", "0"]  # fmt: skip
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
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


@pytest.mark.parametrize("task", ["sequence-classification", "token-classification"])
def test_a_classifier_adapter_loads_in_peft_with_identical_outputs(task, assets, tmp_path):
    peft = pytest.importorskip("peft")
    import transformers

    from deltatune.core.tuned_model import TunedModel

    out = tmp_path / "run"
    train(_args(task, assets, out, max_steps=3), log=lambda *_: None)
    labels = json.loads((out / "run.json").read_text())["data"]["labels"]
    auto = getattr(
        transformers,
        "AutoModelForSequenceClassification" if task.startswith("seq") else "AutoModelForTokenClassification",
    )

    def base():
        torch.manual_seed(123)  # the head is replaced by the adapter's copy either way
        return auto.from_pretrained(assets[task][0], num_labels=len(labels)).eval()

    ids = torch.tensor([[2, 5, 13, 9, 3]])
    ours = TunedModel.from_pretrained(base(), out / "adapter", is_trainable=False)
    theirs = peft.PeftModel.from_pretrained(base(), str(out / "adapter"))
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        assert not torch.allclose(expected, base()(input_ids=ids).logits)  # the adapter changes the output
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected)

"""The `deltatune` command: every subcommand on tiny offline assets, and its error contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import sft_flags

from deltatune.cli.main import build_parser, main, sft_args
from deltatune.cli.parsing import parse_tuner_args


@pytest.fixture(scope="module")
def trained(tiny_assets, tmp_path_factory):
    """A finished tiny sft run: (model folder, data file, run folder)."""
    model_dir, data = tiny_assets
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(sft_flags(model_dir, data, out)) == 0
    return model_dir, data, out


def cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "deltatune.cli.main", *argv], capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_sft_prints_figures_and_writes_the_run(trained, capsys):
    _, _, out = trained
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "loss.png").is_file()
    records = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[-2])


def test_infer_prompt_streams_and_dataset_batches(trained, capsys):
    model_dir, data, out = trained
    assert (
        main(
            [
                "infer",
                "--model",
                str(model_dir),
                "--adapter",
                str(out / "adapter"),
                "--prompt",
                "add one and two",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip()
    assert (
        main(
            [
                "infer",
                "--model",
                str(model_dir),
                "--adapter",
                str(out / "adapter"),
                "--merge",
                "--dataset",
                f"{data}#3",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count("assistant:") == 3


def test_eval_reports_loss_perplexity_and_rouge(trained, tmp_path, capsys):
    model_dir, data, out = trained
    metrics_file = tmp_path / "m.json"
    argv = ["eval", "--model", str(model_dir), "--adapter", str(out / "adapter"), "--dataset", f"{data}#12",
            "--max-length", "32", "--generate", "4", "--max-new-tokens", "4", "--output", str(metrics_file)]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads(metrics_file.read_text())
    assert metrics["rows"] == 12 and metrics["perplexity"] == pytest.approx(
        torch.tensor(metrics["loss"]).exp().item(), rel=1e-5
    )
    assert 0.0 <= metrics["rouge_l"] <= 1.0 and "ROUGE-L" in capsys.readouterr().out
    assert torch.is_grad_enabled(), "an in-process command left autograd switched off"


def test_export_merged_loads_in_plain_transformers_and_matches(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    import deltatune as dt

    model_dir, _, out = trained
    merged_dir = tmp_path / "merged"
    assert (
        main(
            [
                "export",
                "--model",
                str(model_dir),
                "--adapter",
                str(out / "adapter"),
                "--output-dir",
                str(merged_dir),
                "--merge",
            ]
        )
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    tuned = dt.TunedModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter").eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([[5, 9, 30, 41, 7]])
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, tuned(ids).logits, atol=1e-6)  # the adapter matters
        torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, rtol=1e-4, atol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())


def test_export_adapter_is_clean_and_refuses_to_overwrite(trained, tmp_path):
    model_dir, _, out = trained
    target = tmp_path / "clean"
    argv = ["export", "--model", str(model_dir), "--adapter", str(out / "adapter"), "--output-dir", str(target)]
    assert main(argv) == 0
    assert sorted(p.name for p in target.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "deltatune_config.json",
    ]
    assert json.loads((target / "adapter_config.json").read_text())["inference_mode"] is True
    assert main(argv) == 7
    assert main([*argv, "--overwrite"]) == 0


def test_inspect_builds_on_meta_and_counts(trained, capsys):
    model_dir, _, _ = trained
    assert (
        main(["inspect", "--model", str(model_dir), "--tuner", "lora", "--tuner-args", "r=4,target_modules=all-linear"])
        == 0
    )
    text = capsys.readouterr().out
    # 2 layers x (q, k, v, o, gate, up, down); the output head is never "all-linear"
    assert "matched:   14 modules" in text and "meta device" in text and "MiB" in text
    assert "q_proj x2" in text and "lm_head" not in text.split("matched:")[1].split("trainable")[0]


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["sft", "--tuner-args", "rank=4"], 4, "valid fields"),
        (["sft", "--tuner-args", "r=0"], 4, "r must be an integer >= 1"),
        (["sft", "--dataset", "no-such-dataset", "--output-dir", "{tmp}/o"], 5, "unknown dataset"),
        (
            ["sft", "--model", "nobody/no-such-model-xyz", "--dataset", "{data}", "--output-dir", "{tmp}/o"],
            6,
            "could not load",
        ),
        (["sft", "--config", "{tmp}/bad.yaml"], 4, "unknown keys ['learning_rate']"),
        (["sft", "--config", "{tmp}/trust.yaml"], 4, "trust_remote_code cannot be set from a file"),
        (["infer", "--model", "{model}", "--adapter", "{tmp}/missing", "--prompt", "hi"], 11, "does not exist"),
    ],
    ids=[
        "unknown-tuner-arg",
        "bad-value",
        "unknown-dataset",
        "hub-offline",
        "config-unknown-key",
        "config-trust",
        "missing-adapter",
    ],
)
def test_errors_are_one_line_with_distinct_codes(tiny_assets, tmp_path, argv, code, needle, capsys):
    (tmp_path / "bad.yaml").write_text("learning_rate: 0.1\n")
    (tmp_path / "trust.yaml").write_text("trust_remote_code: true\n")
    model_dir, data = tiny_assets
    argv = [a.format(tmp=tmp_path, data=data, model=model_dir) for a in argv]
    if "nobody/" in " ".join(argv):  # the hub client reads HF_HUB_OFFLINE at import: a fresh process
        done = cli(*argv, env={"HF_HUB_OFFLINE": "1"})
        returncode, stderr = done.returncode, done.stderr
    else:
        returncode, stderr = main(argv), capsys.readouterr().err
    assert returncode == code, stderr
    assert needle in stderr and "Traceback" not in stderr
    assert stderr.strip().count("\n") == 0, stderr


def test_debug_shows_the_traceback(capsys):
    assert main(["sft", "--tuner-args", "rank=4", "--debug"]) == 4
    assert "Traceback" in capsys.readouterr().err


def test_tuner_args_parse_json_lists_and_strings():
    assert parse_tuner_args("r=16,lora_alpha=32,target_modules=all-linear") == {
        "r": 16,
        "lora_alpha": 32,
        "target_modules": "all-linear",
    }
    assert parse_tuner_args("target_modules=[q_proj,v_proj],use_dora=true") == {
        "target_modules": ["q_proj", "v_proj"],
        "use_dora": True,
    }
    assert parse_tuner_args('rank_pattern={"q_proj": 4},lora_dropout=0.1') == {
        "rank_pattern": {"q_proj": 4},
        "lora_dropout": 0.1,
    }


def test_config_file_then_flags_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.01\nbatch_size: 2\nnum_epochs: 2\ntuner_args: {r: 4, lora_alpha: 8}\n")
    ns = build_parser().parse_args(["sft", "--config", str(config), "--batch-size", "3", "--tuner-args", "r=2"])
    args = sft_args(ns)
    assert (args.lr, args.batch_size, args.num_epochs, args.max_steps) == (0.01, 3, 2, None)
    assert args.tuner_args == {"r": 2, "lora_alpha": 8} and args.trust_remote_code is False


def test_only_the_flag_turns_on_trust_remote_code():
    ns = build_parser().parse_args(["sft", "--trust-remote-code"])
    assert sft_args(ns).trust_remote_code is True
    assert sft_args(build_parser().parse_args(["sft"])).trust_remote_code is False


def test_models_and_datasets_listings(capsys):
    assert main(["models"]) == 0 and "smollm2-135m-instruct" in capsys.readouterr().out
    assert main(["datasets", "--offline"]) == 0 and "chatterbot-en" in capsys.readouterr().out


def test_rouge_l():
    from deltatune.train.evaluate import lcs_length, rouge_l

    assert lcs_length("a b c d".split(), "a c d e".split()) == 3
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("", "x") == 0.0
    # LCS = police, the, gunman: P = R = 3/4, F1 = 0.75
    assert rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(0.75)


def test_entry_point_is_declared():
    text = Path(__file__).parents[2].joinpath("pyproject.toml").read_text()
    assert 'deltatune = "deltatune.cli.main:main"' in text


def test_no_arguments_is_the_embedded_demo():
    from deltatune.models import get_model_spec
    from deltatune.train.setup import build_tuner_config

    args = sft_args(build_parser().parse_args(["sft"]))
    assert (args.model, args.dataset, args.tuner) == ("smollm2-135m-instruct", "chatterbot-en", "lora")
    assert (args.lr, args.batch_size, args.max_length, args.val_size) == (2e-3, 8, 96, None)  # None: 200, <= 1/5
    config = build_tuner_config(args.tuner, args.tuner_args, get_model_spec(args.model))
    assert (config.r, config.target_modules, config.task_type) == (8, ["q_proj", "v_proj"], "CAUSAL_LM")


def test_disk_full_during_export_leaves_no_half_written_folder(trained, tmp_path, monkeypatch, capsys):
    import errno

    from deltatune.cli import commands

    model_dir, _, out = trained

    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(commands.os, "replace", full)
    target = tmp_path / "merged"
    argv = [
        "export",
        "--model",
        str(model_dir),
        "--adapter",
        str(out / "adapter"),
        "--output-dir",
        str(target),
        "--merge",
    ]
    assert main(argv) == 12
    assert "No space left" in capsys.readouterr().err
    assert not target.exists() and not list(tmp_path.glob(".merged*"))


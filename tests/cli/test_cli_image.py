"""`deltatune sft --task image-classification`: a tiny ViT on digits, and its input errors."""

from __future__ import annotations

import json

import pytest
import torch

from deltatune.cli.main import main


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)  # fmt: skip
    folder = tmp_path_factory.mktemp("vit") / "tiny-vit"
    ViTForImageClassification(config).save_pretrained(folder)  # 3 labels: the run makes a new 10-class head
    return folder


def _flags(model, out, *extra):
    return ["sft", "--task", "image-classification", "--model", str(model), "--dataset", "digits#64",
            "--max-steps", "5", "--batch-size", "16", "--val-size", "16", "--lr", "1e-2", "--output-dir", str(out),
            *extra]  # fmt: skip


def test_image_sft_trains_reports_accuracy_and_saves_the_adapter(tiny_vit, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_flags(tiny_vit, out)) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy before" in printed and "->  after" in printed
    assert "lora on 4 modules + classifier trained in full" in printed  # q_proj/v_proj of 2 layers
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"] and saved["modules_to_save"] == ["classifier"]
    records = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4, 5]
    assert [r["event"] for r in (records[0], records[-1])] == ["eval", "eval"]
    assert 0 <= records[-1]["accuracy"] <= 1

    # the adapter loads back onto a fresh base with the same predictions
    from transformers import ViTForImageClassification

    from deltatune.core.tuned_model import TunedModel

    base = ViTForImageClassification.from_pretrained(tiny_vit, num_labels=10, ignore_mismatched_sizes=True)
    loaded = TunedModel.from_pretrained(base, out / "adapter", is_trainable=False)
    assert loaded(torch.zeros(1, 3, 16, 16)).logits.shape == (1, 10)

    # a non-empty output folder is refused without --overwrite, accepted with it
    assert main(_flags(tiny_vit, out)) == 7
    assert "--overwrite" in capsys.readouterr().err
    assert main(_flags(tiny_vit, out, "--overwrite")) == 0


def test_image_sft_refuses_chat_data_in_one_line(tiny_vit, tiny_assets, tmp_path, capsys):
    _, chat_data = tiny_assets
    flags = _flags(tiny_vit, tmp_path / "run")
    flags[flags.index("digits#64")] = str(chat_data)
    assert main(flags) == 5  # invalid data
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "image-classification needs rows with 'image' and 'label'" in err and "chat rows" in err


def test_image_sft_refuses_unsupported_flags(tiny_vit, tmp_path, capsys):
    assert main(_flags(tiny_vit, tmp_path / "run", "--quantize", "4bit")) == 4
    assert "does not support --quantize" in capsys.readouterr().err

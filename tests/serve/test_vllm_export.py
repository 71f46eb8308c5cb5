"""`deltatune export --for vllm`: an adapter checked against vLLM's LoRA rules, a folder and the command."""

from __future__ import annotations

import json

import pytest

from deltatune.cli.main import main


def export(assets, name, out, *extra):
    return main(["export", "--model", str(assets["model"]), "--adapter", str(assets[name]), "--output-dir", str(out),
                 "--for", "vllm", "--threads", "1", *extra])  # fmt: skip


def test_lora_adapter_gets_a_folder_and_the_vllm_command(assets, tmp_path, capsys):
    out = tmp_path / "alpha-vllm"
    assert export(assets, "alpha", out) == 0
    printed = capsys.readouterr().out
    assert "vllm serve" in printed and f"--lora-modules alpha-vllm={out.resolve()}" in printed
    assert "--max-lora-rank 8" in printed and "targets q_proj, v_proj" in printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert (out / "adapter_model.safetensors").is_file()
    assert "vllm serve" in (out / "vllm-serve.sh").read_text()


@pytest.mark.parametrize(
    ("name", "why"), [("beta", "DoRA"), ("gamma", "LoRA adapters only"), ("prompt", "LoRA adapters only")]
)
def test_what_vllm_cannot_serve_is_refused_before_writing(assets, tmp_path, capsys, name, why):
    out = tmp_path / name
    assert export(assets, name, out) == 4
    assert why in capsys.readouterr().err and not out.exists()


def test_the_folder_loads_in_vllm(assets, tmp_path):
    pytest.importorskip("vllm", reason="vllm is not importable here (not installed in this environment)")
    from vllm.lora.peft_helper import PEFTHelper

    out = tmp_path / "alpha-vllm"
    assert export(assets, "alpha", out) == 0
    helper = PEFTHelper.from_local_dir(str(out), max_position_embeddings=256)
    assert helper.r == 4

"""`deltatune export --to gguf / gguf-lora / --ollama / --push-to-hub` end to end, on an adapter
trained by `deltatune sft` on the tiny offline assets."""

from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")

import hub_servers  # noqa: E402
from train_helpers import make_assets, sft_flags  # noqa: E402

from deltatune.cli.main import main  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(model folder, run folder) of a 6-step LoRA run."""
    folder = tmp_path_factory.mktemp("export-cli")
    model_dir, data = make_assets(folder)
    out = folder / "run"
    torch.set_num_threads(1)
    assert main(sft_flags(model_dir, data, out)) == 0
    return model_dir, out


def test_gguf_with_ollama_and_card_dry_run(run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import deltatune as dt

    model_dir, out = run
    dest = tmp_path / "gguf"
    code = main(["export", "--model", str(model_dir), "--adapter", str(out / "adapter"), "--output-dir", str(dest),
                 "--to", "gguf", "--gguf-type", "q8_0", "--ollama", "--push-to-hub", "me/tiny", "--dry-run"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "would upload 3 files" in printed and "model-q8_0.gguf" in printed
    assert sorted(p.name for p in dest.iterdir()) == [
        ".deltatune-export.json",
        "Modelfile",
        "README.md",
        "model-q8_0.gguf",
    ]
    card = (dest / "README.md").read_text()
    assert (
        "library_name: gguf" in card
        and "eval_loss_after" in card
        and "deltatune sft" in card
        and "--max-steps 6" in card
    )
    assert (dest / "Modelfile").read_text().startswith("FROM ./model-q8_0.gguf\nTEMPLATE")
    # the GGUF computes what the merged adapter computes (hidden 16: rows under 32 values fall back to f16)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    merged = dt.TunedModel.from_pretrained(base, out / "adapter").merge_and_unload()
    loaded = AutoModelForCausalLM.from_pretrained(dest, gguf_file="model-q8_0.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert (merged(ids).logits - loaded(ids).logits).abs().max() < 5e-3


def test_gguf_folder_can_be_overwritten(run, tmp_path):
    model_dir, out = run
    argv = [
        "export",
        "--model",
        str(model_dir),
        "--adapter",
        str(out / "adapter"),
        "--output-dir",
        str(tmp_path / "g"),
        "--to",
        "gguf",
    ]
    assert main(argv) == 0
    assert main([*argv, "--gguf-type", "f32"]) == 7  # not empty: needs --overwrite
    assert main([*argv, "--gguf-type", "f32", "--overwrite"]) == 0  # a folder deltatune wrote may be replaced
    assert (tmp_path / "g" / "model-f32.gguf").is_file() and not (tmp_path / "g" / "model-f16.gguf").exists()


def test_gguf_lora_with_ollama(run, tmp_path):
    model_dir, out = run
    dest = tmp_path / "lora"
    code = main(["export", "--model", str(model_dir), "--adapter", str(out / "adapter"), "--output-dir", str(dest),
                 "--to", "gguf-lora", "--ollama"])  # fmt: skip
    assert code == 0
    assert {"adapter-f32.gguf", "base-f16.gguf", "Modelfile"} <= {p.name for p in dest.iterdir()}
    modelfile = (dest / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./base-f16.gguf\nADAPTER ./adapter-f32.gguf\n")
    reader = gguf.GGUFReader(dest / "adapter-f32.gguf")
    assert reader.fields["adapter.lora.alpha"].contents() == 8.0
    assert {t.name for t in reader.tensors} == {
        f"blk.{i}.attn_{p}.weight.lora_{ab}" for i in (0, 1) for p in "qv" for ab in "ab"
    }


def test_push_adapter_to_huggingface(run, tmp_path, monkeypatch, capsys):
    model_dir, out = run
    server = hub_servers.start("huggingface")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_cli_SECRET_123")
    try:
        code = main(["export", "--model", str(model_dir), "--adapter", str(out / "adapter"),
                     "--output-dir", str(tmp_path / "up"), "--push-to-hub", "me/tiny-adapter", "--private"])  # fmt: skip
    finally:
        server.stop()
    assert code == 0
    files = server.repos["me/tiny-adapter"]["files"]
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors", "deltatune_config.json"}
    assert b"library_name: peft" in files["README.md"] and b"eval_loss_before" in files["README.md"]
    assert server.requests[0].json()["visibility"] == "private"
    assert "hf_cli_SECRET_123" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [(["--ollama"], "--ollama needs a GGUF"), (["--dry-run"], "apply to --push-to-hub only"),
     (["--push-to-hub", "not a repo"], "owner/name")],
)  # fmt: skip
def test_flag_errors(run, tmp_path, capsys, flags, message):
    model_dir, out = run
    code = main(
        [
            "export",
            "--model",
            str(model_dir),
            "--adapter",
            str(out / "adapter"),
            "--output-dir",
            str(tmp_path / "x"),
            *flags,
        ]
    )
    assert code == 4
    assert message in capsys.readouterr().err

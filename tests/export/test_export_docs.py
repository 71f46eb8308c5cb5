"""docs/export.md: every `deltatune export --adapter runs/demo/adapter ...` command runs (the tiny test
model and its 6-step adapter in place of SmolLM2 and the demo run; local stand-ins for the hubs),
its Python snippet runs, and its Modelfile example is what SmolLM2's tokenizer gives."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import hub_servers
import pytest
import torch
from train_helpers import make_assets, sft_flags

from deltatune.cli.main import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "export.md"


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def _export_commands() -> list[str]:
    lines = [line.strip() for block in _blocks("bash") for line in block.splitlines()]
    return [line for line in lines if line.startswith("deltatune export") and "--adapter runs/demo/adapter" in line]


def test_doc_has_the_commands():
    commands = _export_commands()
    assert len(commands) >= 7
    for flag in (
        "--to gguf",
        "--to gguf-lora",
        "--ollama",
        "--gguf-type q8_0",
        "--push-to-hub",
        "--hub modelscope",
        "--dry-run",
    ):
        assert any(flag in c for c in commands), flag


def test_export_commands_run(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    model_dir, data = make_assets(tmp_path / "assets")
    monkeypatch.chdir(tmp_path)
    assert main(sft_flags(model_dir, data, Path("runs/demo"))) == 0
    hf, ms = hub_servers.start("huggingface"), hub_servers.start("modelscope")
    monkeypatch.setenv("HF_ENDPOINT", hf.url)
    monkeypatch.setenv("HF_TOKEN", "hf_docs_token")
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", ms.url)
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "ms_docs_token")
    monkeypatch.setenv("API_HTTP_CLIENT_MAX_RETRIES", "0")
    try:
        for command in _export_commands():
            argv = shlex.split(command)[1:] + ["--model", str(model_dir)]
            assert main(argv) == 0, command
            out = Path(argv[argv.index("--output-dir") + 1])
            assert out.is_dir() and any(out.iterdir()), command
    finally:
        hf.stop()
        ms.stop()
    assert set(hf.repos) == {"me/smollm2-chatterbot-gguf"} and hf.repos["me/smollm2-chatterbot-gguf"]["private"]
    assert set(ms.repos) == {"me/smollm2-chatterbot"} and ms.repos["me/smollm2-chatterbot"]["private"]


def test_python_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (code,) = _blocks("python")
    exec(compile(code, "docs/export.md", "exec"), {"__name__": "__docs__"})


def test_modelfile_example_matches_smollm2(tmp_path):
    from deltatune.models import get_model_spec, is_offline_available

    spec = get_model_spec("smollm2-135m-instruct")
    if spec is None or not is_offline_available(spec):
        pytest.skip("SmolLM2 asset not installed")
    from deltatune.export.ollama import write_modelfile
    from deltatune.models import load_tokenizer, resolve_model

    source, _ = resolve_model("smollm2-135m-instruct", log=lambda *_: None)
    example = re.search(r"```\n(FROM \./model-f16\.gguf\n.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S).group(1)
    written = write_modelfile(tmp_path, "model-f16.gguf", load_tokenizer(source))
    assert written.read_text() == example

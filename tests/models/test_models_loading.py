"""Loading rules: remote code is refused unless the caller opts in (tested with fake local folders,
never downloading), registry folders are found offline, tokenizers without a chat template get the
registry's fallback, and `deltatune models` lists the catalogue."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from deltatune.cli.main import main
from deltatune.models import MODELS, RemoteCodeError, check_remote_code, local_dir, resolve_model, template_text
from deltatune.models.registry import load_config, load_model, load_tokenizer

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

REMOTE_CONFIG = {
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


def _fake_checkpoint(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    # code that must never run: importing it would create a marker file
    (folder / "configuration_chatglm.py").write_text(f"open({str(folder / 'RAN')!r}, 'w').close()\n")
    return folder


def test_registry_entry_needing_remote_code_is_refused_before_download(cache):
    with pytest.raises(RemoteCodeError, match="'chatglm3-6b' needs --trust-remote-code: the chatglm3 family"):
        resolve_model("chatglm3-6b", trust_remote_code=False)
    assert resolve_model("chatglm3-6b") == ("THUDM/chatglm3-6b", MODELS["chatglm3-6b"])  # no check asked
    with pytest.raises(RemoteCodeError, match="ships its own modeling code"):
        load_config("THUDM/chatglm3-6b")  # the hub id of a remote-code entry, refused before any request
    assert resolve_model("qwen2.5-7b-instruct", trust_remote_code=False)[0] == "Qwen/Qwen2.5-7B-Instruct"


def test_local_copy_of_a_remote_code_entry_is_refused(cache):
    folder = _fake_checkpoint(local_dir(MODELS["chatglm3-6b"]), REMOTE_CONFIG)
    source, spec = resolve_model("chatglm3-6b")
    assert Path(source) == folder and spec is MODELS["chatglm3-6b"]
    for load in (load_config, load_model, load_tokenizer):
        with pytest.raises(RemoteCodeError, match="runs Python files from the checkpoint"):
            load(source)
    assert not (folder / "RAN").exists()
    check_remote_code(source, trust_remote_code=True)  # the user's explicit opt-in passes the check


def test_unregistered_folder_with_auto_map_is_refused(tmp_path):
    folder = _fake_checkpoint(tmp_path / "glm", REMOTE_CONFIG)
    with pytest.raises(RemoteCodeError, match=r"auto_map"):
        load_model(str(folder))
    assert not (folder / "RAN").exists()
    native = _fake_checkpoint(tmp_path / "gpt2ish", {**REMOTE_CONFIG, "model_type": "gpt2"})
    check_remote_code(str(native), trust_remote_code=False)  # transformers has gpt2: no custom code runs


def test_cli_refuses_remote_code_with_exit_6(cache, capsys):
    _fake_checkpoint(local_dir(MODELS["chatglm3-6b"]), REMOTE_CONFIG)
    assert main(["inspect", "--model", "chatglm3-6b"]) == 6
    err = capsys.readouterr().err
    assert "needs --trust-remote-code" in err and err.strip().count("\n") == 0 and "Traceback" not in err


def test_fallback_template_is_installed_for_registry_tokenizers_without_one(cache):
    from train_helpers import build_tokenizer

    from deltatune.data.tokenization import encode_chat

    folder = local_dir(MODELS["llama2-7b-chat"])
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.save_pretrained(folder)
    source, _ = resolve_model("llama2-7b-chat", trust_remote_code=False)
    loaded = load_tokenizer(source)
    assert loaded.chat_template == template_text("llama2")
    messages = [{"role": "user", "content": "add one and two"}, {"role": "assistant", "content": "one plus two is 3"}]
    example = encode_chat(loaded, messages, max_length=64)
    assert example["labels"][-1] == loaded.eos_token_id  # the answer is supervised up to its EOS
    # a tokenizer that has its own template keeps it
    own = build_tokenizer()
    own.save_pretrained(folder)
    assert load_tokenizer(source).chat_template == own.chat_template


def test_models_listing(cache, capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "family", "hugging", "face", "modelscope", "offline", "remote", "code"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(MODELS)
    assert rows["chatglm3-6b"][1:] == ["chatglm3", "THUDM/chatglm3-6b", "ZhipuAI/chatglm3-6b", "no", "yes"]
    assert rows["qwen2.5-7b-instruct"][-1] == "no"
    _fake_checkpoint(local_dir(MODELS["qwen3-8b"]), {"model_type": "qwen3"})
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert [line.split() for line in out.splitlines() if line.startswith("qwen3-8b ")][0][-2] == "yes"

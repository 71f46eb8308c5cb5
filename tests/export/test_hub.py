"""Hub upload and download against local servers that speak the Hugging Face and ModelScope APIs
the official clients call (tests/export/hub_servers.py): recorded requests are checked (files, model
card, private flag, token in the Authorization header only), and no token reaches disk or logs."""

from __future__ import annotations

import logging

import hub_servers
import pytest
import torch
from export_helpers import byte_level_tokenizer, tiny_model

import deltatune as dt
from deltatune.export.hub import HubError, push_folder
from deltatune.models.registry import ModelError, RemoteCodeError, load_model, load_tokenizer, resolve_model

HF_TOKEN = "hf_SECRETtoken0123456789"
MS_TOKEN = "ms-SECRET-token-9876543210"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """Every place a client could write credentials or caches, under tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    for var, sub in (("HOME", ""), ("HF_HOME", "hf"), ("MODELSCOPE_CACHE", "ms"), ("DELTATUNE_CACHE", "dt"),
                     ("MODELSCOPE_CREDENTIALS_PATH", "ms-credentials"), ("XDG_CACHE_HOME", "xdg")):  # fmt: skip
        monkeypatch.setenv(var, str(home / sub))
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / "hf" / "token"))
    for var in (
        "HF_HUB_OFFLINE",
        "DELTATUNE_OFFLINE",
        "MODELSCOPE_OFFLINE",
        "DELTATUNE_HUB",
        "HF_TOKEN",
        "MODELSCOPE_API_TOKEN",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("API_HTTP_CLIENT_MAX_RETRIES", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return home


@pytest.fixture
def hf(home, monkeypatch):
    server = hub_servers.start("huggingface")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    yield server
    server.stop()


@pytest.fixture
def ms(home, monkeypatch):
    server = hub_servers.start("modelscope")
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.url)
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", MS_TOKEN)
    yield server
    server.stop()


@pytest.fixture
def adapter_dir(tmp_path):
    tuned = dt.get_tuned_model(tiny_model("llama", 96), dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    folder = tmp_path / "export"
    tuned.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# card\n")
    (folder / ".deltatune-export.json").write_text("{}")  # hidden: never uploaded
    return folder


def _local_files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}


def test_huggingface_upload_private(hf, adapter_dir):
    plan = push_folder(adapter_dir, "me/tiny-lora", private=True)
    assert [r.path for r in hf.requests] == [
        "/api/repos/create", "/api/validate-yaml", "/api/models/me/tiny-lora/preupload/main", "/api/models/me/tiny-lora/commit/main",
    ]  # fmt: skip
    assert hf.requests[0].json() == {
        "name": "tiny-lora",
        "organization": "me",
        "visibility": "private",
        "type": "model",
    }
    assert hf.repos["me/tiny-lora"]["files"] == _local_files(adapter_dir)
    assert all(r.headers.get("authorization") == f"Bearer {HF_TOKEN}" for r in hf.requests)
    assert plan.url and "me/tiny-lora" in plan.url and len(plan.files) == 4


def test_modelscope_upload_private(ms, adapter_dir):
    push_folder(adapter_dir, "me/tiny-lora", hub="modelscope", private=True)
    create = ms.requests[0]
    assert create.path == "/api/v1/models" and create.json()["Visibility"] == 1  # 1 = private on ModelScope
    assert ms.repos["me/tiny-lora"]["private"] is True
    assert ms.repos["me/tiny-lora"]["files"] == _local_files(adapter_dir)  # safetensors via LFS, rest inline
    assert any(r.path.endswith("/info/lfs/objects/batch") for r in ms.requests)
    assert all(r.headers.get("authorization") == f"Bearer {MS_TOKEN}" for r in ms.requests if r.path.startswith("/api"))


def test_dry_run_sends_nothing(hf, adapter_dir):
    plan = push_folder(adapter_dir, "me/tiny-lora", dry_run=True)
    assert hf.requests == []
    assert "would upload 4 files" in plan.summary() and "adapter_model.safetensors" in plan.summary()


@pytest.mark.parametrize("hub, var", [("huggingface", "HF_TOKEN"), ("modelscope", "MODELSCOPE_API_TOKEN")])
def test_missing_token_is_an_error_before_any_request(hf, ms, adapter_dir, monkeypatch, hub, var):
    monkeypatch.delenv(var)
    with pytest.raises(HubError, match=var):
        push_folder(adapter_dir, "me/tiny-lora", hub=hub)
    assert hf.requests == [] and ms.requests == []


def test_bad_repo_id(adapter_dir):
    with pytest.raises(HubError, match="owner/name"):
        push_folder(adapter_dir, "../etc", dry_run=True)


def test_tuned_model_push_to_hub(hf):
    tuned = dt.get_tuned_model(tiny_model("llama", 96), dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    plan = tuned.push_to_hub("me/from-python")
    files = hf.repos["me/from-python"]["files"]
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors", "deltatune_config.json"}
    assert b"library_name: peft" in files["README.md"] and b'"r": 4' in files["README.md"]
    assert hf.requests[0].json()["visibility"] == "public" and plan.private is False
    with pytest.raises(dt.ConfigError if hasattr(dt, "ConfigError") else Exception, match="HF_TOKEN"):
        tuned.push_to_hub("me/x", token="abc")


def test_no_token_on_disk_or_in_logs(hf, ms, adapter_dir, home, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    push_folder(adapter_dir, "me/a", hub="huggingface")
    push_folder(adapter_dir, "me/b", hub="modelscope", private=True)
    assert hf.repos["me/a"]["files"] and ms.repos["me/b"]["files"]  # the uploads happened
    out = capsys.readouterr()
    for text in (out.out, out.err, caplog.text):
        assert HF_TOKEN not in text and MS_TOKEN not in text
    from pathlib import Path

    import huggingface_hub.constants as hf_constants
    from modelscope_hub.config import get_default_config

    # the test's HOME, and where the SDKs keep credentials if they fixed those paths at import
    places = [tmp_path, Path(get_default_config().credentials_dir), Path(hf_constants.HF_HOME)]
    for path in (p for place in places if place.exists() for p in place.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            assert HF_TOKEN.encode() not in data and MS_TOKEN.encode() not in data, path


# -- download from ModelScope ------------------------------------------------------------------------
@pytest.fixture
def ms_model(ms, tmp_path):
    """A tiny Llama published on the fake ModelScope as owner/tiny (plus a pickle and a .py that must not be fetched)."""
    folder = tmp_path / "publish"
    tokenizer = byte_level_tokenizer()
    model = tiny_model("llama", len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    files["pytorch_model.bin"] = b"not a real pickle"
    files["modeling_evil.py"] = b"raise SystemExit('remote code ran')"
    ms.repos["owner/tiny"] = {"private": False, "files": files}
    return model, tokenizer


def test_modelscope_download_loads_and_skips_pickles_and_code(ms, ms_model):
    model, tokenizer = ms_model
    source, spec = resolve_model("ms://owner/tiny", log=lambda *_: None)
    names = {p.name for p in __import__("pathlib").Path(source).iterdir()}
    assert "config.json" in names and "model.safetensors" in names
    assert "pytorch_model.bin" not in names and "modeling_evil.py" not in names
    loaded = load_model(source)
    ids = tokenizer("add one and two", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert load_tokenizer(source)("add one and two").input_ids == ids[0].tolist()
    fetched = [r.query.get("FilePath", [""])[0] for r in ms.requests if r.path.endswith("/repo")]
    assert "pytorch_model.bin" not in fetched and "modeling_evil.py" not in fetched


def test_modelscope_hub_flag_and_prefixes(ms, ms_model, monkeypatch):
    first, _ = resolve_model("modelscope://owner/tiny", log=lambda *_: None)
    second, _ = resolve_model("owner/tiny", hub="modelscope", log=lambda *_: None)
    monkeypatch.setenv("DELTATUNE_HUB", "ms")
    third, _ = resolve_model("owner/tiny", log=lambda *_: None)
    assert first == second == third


def test_modelscope_offline_uses_cache_then_refuses_without_one(ms, ms_model, monkeypatch):
    online, _ = resolve_model("ms://owner/tiny", log=lambda *_: None)
    ms.stop()  # the hub goes away
    import modelscope_hub._legacy_api as legacy

    monkeypatch.setattr(legacy, "REPO_TREE_PAGE_MAX_ATTEMPTS", 1)  # the SDK retries 4x with backoff (7 s)
    said = []
    fallback, _ = resolve_model("ms://owner/tiny", log=said.append)
    assert fallback == online and "cached copy" in said[0]
    monkeypatch.setenv("DELTATUNE_OFFLINE", "1")
    before = len(ms.requests)
    assert resolve_model("ms://owner/tiny", log=lambda *_: None)[0] == online
    assert len(ms.requests) == before  # offline: no request at all
    with pytest.raises(ModelError, match="not in the ModelScope cache"):
        resolve_model("ms://owner/never-downloaded", log=lambda *_: None)


def test_modelscope_remote_code_is_refused(ms, ms_model):
    import json

    files = ms.repos["owner/tiny"]["files"]
    config = json.loads(files["config.json"])
    config.update(model_type="evil", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"})
    ms.repos["owner/evil"] = {"private": False, "files": {**files, "config.json": json.dumps(config).encode()}}
    source, _ = resolve_model("ms://owner/evil", log=lambda *_: None)
    with pytest.raises(RemoteCodeError, match="--trust-remote-code"):
        load_model(source)


# -- data sets from ModelScope ----------------------------------------------------------------------
def test_modelscope_dataset_spec(ms, monkeypatch):
    import json

    from deltatune.data import DataError, load_rows

    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(6)
    ]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    ms.datasets["owner/chat"] = {
        "files": {
            "data/train.jsonl": data,
            "data/test.jsonl": data.splitlines(keepends=True)[0],
            "README.md": b"# card",
        }
    }
    loaded, _ = load_rows("ms://owner/chat#4")
    assert len(loaded) == 4 and loaded[0]["messages"][0]["role"] == "user"
    one_file, _ = load_rows("ms://owner/chat/data/test.jsonl")
    assert len(one_file) == 1
    ms.datasets["owner/two"] = {"files": {"a.jsonl": data, "b.jsonl": data}}
    with pytest.raises(DataError, match=r"holds 2 data files \(a.jsonl, b.jsonl\); name one: ms://owner/two/FILE"):
        load_rows("ms://owner/two")
    monkeypatch.setenv("DELTATUNE_OFFLINE", "1")
    assert len(load_rows("ms://owner/chat")[0]) == 6  # from the cache, no request
    with pytest.raises(DataError, match="not in the ModelScope cache"):
        load_rows("ms://owner/never")


def test_hub_refusal_is_one_line(home, adapter_dir, monkeypatch):
    refuse = [
        (
            "POST",
            "/api/repos/create",
            "",
            lambda hub, req: hub_servers._json({"error": "Invalid credentials in Authorization header"}, 401),
        )
    ]
    server = hub_servers.start("huggingface", routes=refuse)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    try:
        with pytest.raises(HubError) as info:
            push_folder(adapter_dir, "me/denied")
    finally:
        server.stop()
    message = str(info.value)
    assert message.startswith("upload to Hugging Face repo me/denied failed: ") and "\n" not in message
    assert "401" in message and HF_TOKEN not in message


def test_infer_hub_modelscope_flag(ms, ms_model, capsys):
    from deltatune.cli.main import main

    assert (
        main(
            [
                "infer",
                "--model",
                "owner/tiny",
                "--hub",
                "modelscope",
                "--prompt",
                "add one and two",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert any(r.path == "/api/v1/models/owner/tiny/repo/files" for r in ms.requests)


def test_modelscope_pickle_only_repo_is_refused(ms, ms_model):
    files = {k: v for k, v in ms.repos["owner/tiny"]["files"].items() if not k.endswith(".safetensors")}
    ms.repos["owner/pickled"] = {"private": False, "files": files}
    with pytest.raises(ModelError, match="no safetensors weights"):
        resolve_model("ms://owner/pickled", log=lambda *_: None)
    assert not any(r.query.get("FilePath") == ["pytorch_model.bin"] for r in ms.requests)

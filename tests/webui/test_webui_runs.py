"""The web UI's command lines and run folders, without a browser: the shown command parses back to the
form's values through the CLI's own parser, a SIGTERMed run is listed as resumable and its resume
command (rebuilt from run.json) continues it, tuner fields carry their docstrings, and a public bind
needs a password."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

from train_helpers import make_assets, sft_flags  # noqa: E402

from deltatune.cli.main import build_parser, main, sft_args  # noqa: E402
from deltatune.webui import runs  # noqa: E402


def test_shown_command_parses_to_the_form_values():
    form = {"model": "tiny", "dataset": "my data.jsonl", "task": "causal-lm", "tuner": "lora", "max_steps": 7,
            "tuner_args": "r=4,target_modules=[q_proj,v_proj]", "lr": 0.01, "val_size": 16.0, "output_dir": "out",
            "overwrite": True, "packing": False}  # fmt: skip
    argv = runs.sft_argv(form)
    assert runs.shown(argv).startswith(
        "deltatune sft --max-steps 7 --task causal-lm --model tiny --dataset 'my data.jsonl'"
    )
    args = sft_args(build_parser().parse_args(argv))
    assert (args.model, args.dataset, args.max_steps, args.lr, args.val_size, args.output_dir) == (
        "tiny",
        "my data.jsonl",
        7,
        0.01,
        16.0,
        "out",
    )
    assert args.tuner_args["r"] == 4 and args.tuner_args["target_modules"] == ["q_proj", "v_proj"]
    assert args.overwrite and args.packing is False


def test_export_command_carries_gguf_ollama_and_hub_fields_to_the_cli():
    argv = runs.export_argv(
        "tiny", "run/adapter", "out", "gguf", True, "q8_0", True, " me/demo ", "modelscope", True, True
    )
    ns = build_parser().parse_args(argv)
    assert (ns.to, ns.gguf_type, ns.ollama, ns.overwrite) == ("gguf", "q8_0", True, True)
    assert (ns.push_to_hub, ns.hub, ns.private, ns.dry_run) == ("me/demo", "modelscope", True, True)
    merged = build_parser().parse_args(runs.export_argv("tiny", "a", "o", "merge", False, "f16", True, "", "x", True))
    assert merged.merge and merged.gguf_type is None and not merged.ollama  # GGUF fields only for GGUF kinds
    assert merged.push_to_hub is None and not merged.private  # hub fields only with a repository


def test_tuner_fields_have_docstrings_and_only_changes_become_tuner_args():
    rows = runs.tuner_fields("lora")
    by_name = {name: (default, help_) for name, default, help_ in rows}
    assert by_name["r"][0] == "8" and "Rank of the update" in by_name["r"][1]
    assert "target_modules" in by_name
    assert by_name["lora_alpha"][0] == "16"  # the run default `deltatune sft` fills in, not the class's 8
    assert by_name["target_modules"][0] == "" and "registry's targets" in by_name["target_modules"][1]
    table_says = [[n, "[q_proj]" if n == "target_modules" else d, h] for n, d, h in rows]
    assert runs.tuner_args(table_says, "lora", "target_modules=[v_proj]") == "target_modules=[v_proj]"  # box wins
    edited = [[n, "16" if n == "r" else d, h] for n, d, h in rows]
    assert runs.tuner_args(edited, "lora", "target_modules=[q_proj]") == "r=16,target_modules=[q_proj]"
    assert runs.tuner_args(rows, "lora") == ""


def test_public_bind_needs_a_password():
    from deltatune.core.config import ConfigError
    from deltatune.webui.app import check_bind

    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "secret")
    with pytest.raises(ConfigError, match="--password"):
        check_bind("0.0.0.0", None)
    assert main(["webui", "--host", "0.0.0.0"]) == 4


def test_interrupted_run_is_resumable_and_its_resume_command_finishes_it(tmp_path, monkeypatch, capsys):
    import torch

    torch.set_num_threads(1)
    model_dir, data = make_assets(tmp_path)
    out = tmp_path / "runs" / "a"
    monkeypatch.setenv("DELTATUNE_FAULT", "term@after_step:2")
    assert main(sft_flags(model_dir, data, out)) == 10  # SIGTERM: checkpoint at step 2, exit 10
    monkeypatch.delenv("DELTATUNE_FAULT")
    [listed] = runs.list_runs(tmp_path / "runs")
    assert listed["status"] == "interrupted (resumable)" and listed["step"] == 2 and listed["max_steps"] == 6
    argv = runs.resume_argv(out)
    assert "--resume" in argv and argv[argv.index("--output-dir") + 1] == str(out)
    assert main(argv) == 0
    assert "resumed from" in capsys.readouterr().out
    assert runs.run_status(out)["status"] == "finished" and runs.run_status(out)["step"] == 6
    assert [r["step"] for r in runs.read_logs(out) if r.get("event") == "train"] == [1, 2, 3, 4, 5, 6]


def test_chat_rows_equal_separate_models_and_adapters_join_without_reloading_the_base(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from deltatune.core.tuned_model import TunedModel
    from deltatune.webui.chat import EMPTY, ChatModel

    torch.set_num_threads(1)
    model_dir, data = make_assets(tmp_path)
    assert main(sft_flags(model_dir, data, tmp_path / "a", "--lr", "5e-2")) == 0
    assert main(sft_flags(model_dir, data, tmp_path / "b", "--seed", "7", "--lr", "5e-2")) == 0
    chat = ChatModel()
    *_, first = chat.stream(str(model_dir), [str(tmp_path / "a" / "adapter")], "add one and two", 6)
    base_object = chat.model
    *_, both = chat.stream(str(model_dir), [str(tmp_path / "a" / "adapter"), str(tmp_path / "b" / "adapter")],
                           "add one and two", 6)  # fmt: skip
    assert chat.model is base_object and list(chat.adapters) == ["adapter1", "adapter2"]  # base loaded once
    assert both[:2] == first

    def alone(adapter):  # the same prompt through a model holding only that adapter (or none)
        tok = chat.tokenizer
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        if adapter:
            model = TunedModel.from_pretrained(model, str(adapter))
        text = tok.apply_chat_template([{"role": "user", "content": "add one and two"}], add_generation_prompt=True,
                                       tokenize=False)  # fmt: skip
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        ids = out[0, enc["input_ids"].shape[1] :].tolist()
        ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
        return tok.decode(ids, skip_special_tokens=True) or EMPTY

    expected = [alone(None), alone(tmp_path / "a" / "adapter"), alone(tmp_path / "b" / "adapter")]
    assert len(set(expected)) > 1  # the adapters change the answer, so the comparison means something
    assert both == expected


def test_password_guards_the_page_and_its_api(tmp_path):
    import http.cookiejar
    import socket
    import urllib.error
    import urllib.parse
    import urllib.request

    pytest.importorskip("gradio", reason="Gradio is not installed (pip install -e '.[test]')")
    from deltatune.webui.app import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = launch("127.0.0.1", port, password="pw", runs_dir=str(tmp_path), block=False)
    base = f"http://127.0.0.1:{port}"
    try:
        for path in ("/config", "/gradio_api/info"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(base + path, timeout=30)
            assert refused.value.code == 401
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        with pytest.raises(urllib.error.HTTPError):
            opener.open(base + "/login", data=urllib.parse.urlencode({"username": "me", "password": "no"}).encode())
        opener.open(base + "/login", data=urllib.parse.urlencode({"username": "me", "password": "pw"}).encode())
        assert opener.open(base + "/config", timeout=30).status == 200
    finally:
        app.close()

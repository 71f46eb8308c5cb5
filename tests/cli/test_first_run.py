"""First-run friction (issue 24): thread policy line, output dir that is a file, a failed run leaves
nothing behind, --adapter RUN_DIR, 'did you mean', hub id with no network, Chinese samples and
ROUGE, one source of tuner defaults for inspect and sft, interactive infer, eval progress."""

from __future__ import annotations

import io
import json
import socket
import sys
import time
from pathlib import Path

import pytest
from train_helpers import sft_flags

from deltatune.cli.main import main

ZH_ROWS = [
    ("你好吗", "我很好，谢谢"),
    ("今天天气怎么样", "今天天气很好"),
    ("你叫什么名字", "我的名字是小明"),
    ("你喜欢什么", "我喜欢读书"),
] * 6


@pytest.fixture(scope="module")
def zh_run(tiny_assets, tmp_path_factory):
    """A one-step tiny sft run on Chinese chat rows with --tuner-args r=16 (default lora_alpha)."""
    model_dir, _ = tiny_assets
    folder = tmp_path_factory.mktemp("zh")
    data = folder / "zh.jsonl"
    data.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                           ensure_ascii=False) + "\n" for q, a in ZH_ROWS), encoding="utf-8",
    )  # fmt: skip
    out = folder / "run"
    flags = sft_flags(model_dir, data, out, "--num-samples", "2", "--max-new-tokens", "2", "--val-size", "8")
    flags[flags.index("--max-steps") + 1] = "1"
    flags[flags.index("--tuner-args") + 1] = "r=16"
    flags[flags.index("--max-length") + 1] = "128"  # Chinese is ~3 byte-level tokens a character here
    assert main(flags) == 0
    return model_dir, out


def test_chinese_rows_give_sample_answers(zh_run):
    _, out = zh_run
    records = [json.loads(line) for line in (out / "logs.jsonl").read_text(encoding="utf-8").splitlines()]
    samples = [r for r in records if r["event"] == "samples"]
    assert samples and len(samples[0]["answers"]) == 2  # no space-separated words, yet two samples


def test_inspect_shows_the_config_sft_trains(zh_run, capsys):
    model_dir, out = zh_run
    capsys.readouterr()
    assert main(["inspect", "--model", str(model_dir), "--tuner-args", "r=16"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tuner:"))
    shown = json.loads(line.split(" ", 2)[2].strip().split(" ", 1)[1])
    trained = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert shown["r"] == trained["r"] == 16
    for key, value in shown.items():
        if key in trained and key not in ("base_model_name_or_path", "inference_mode", "target_modules"):
            assert trained[key] == value, key
    assert shown["lora_alpha"] == trained["lora_alpha"]


def test_threads_flag_and_policy_line(zh_run, capsys):
    model_dir, out = zh_run
    argv = ["infer", "--model", str(model_dir), "--adapter", str(out / "adapter"), "--prompt", "你好吗"]
    assert main([*argv, "--max-new-tokens", "2", "--threads", "1"]) == 0
    out_text = capsys.readouterr().out
    assert "threads: 1 (--threads" in out_text and "OpenMP wait policy:" in out_text
    assert main([*argv, "--threads", "0"]) == 4
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_output_dir_that_is_a_file(tiny_assets, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    assert main(sft_flags(*tiny_assets, target)) == 7
    err = capsys.readouterr().err
    assert "is a file" in err and "Errno" not in err and err.count("\n") == 1


def test_a_run_that_fails_before_training_leaves_nothing(tiny_assets, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    flags = sft_flags(*tiny_assets, out)
    flags[flags.index("--dataset") + 1] = "chaterbot-en"
    assert main(flags) == 5
    assert "did you mean 'chatterbot-en'?" in capsys.readouterr().err
    assert not out.exists() and not out.parent.exists()  # no folder holding only .lock
    kept = tmp_path / "mine"
    kept.mkdir()
    flags[flags.index("--output-dir") + 1] = str(kept)
    assert main(flags) == 5
    assert kept.is_dir() and list(kept.iterdir()) == []  # the user's own folder stays, without .lock


def test_adapter_given_the_run_folder_suggests_its_adapter(zh_run, capsys):
    model_dir, out = zh_run
    assert main(["infer", "--model", str(model_dir), "--adapter", str(out), "--prompt", "hi"]) == 11
    assert f"did you mean {out / 'adapter'}?" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["sfft"], "did you mean 'sft'?"),
        (["sft", "--lr-schedular", "cosine"], "did you mean '--lr-scheduler'?"),
        (["sft", "--lr-scheduler", "cosin"], "did you mean 'cosine'?"),
    ],
)
def test_usage_typos_say_did_you_mean(argv, needle, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2 and needle in capsys.readouterr().err


def test_value_typos_say_did_you_mean(tiny_assets, tmp_path, capsys):
    flags = sft_flags(*tiny_assets, tmp_path / "o")
    flags[flags.index("--tuner-args") + 1] = "rr=4"
    assert main(flags) == 4
    assert "did you mean 'r'?" in capsys.readouterr().err
    assert main(["inspect", "--model", "smollm2-135-instruct"]) == 6
    assert "did you mean 'smollm2-135m-instruct'?" in capsys.readouterr().err
    assert main(["inspect", "--tuner", "lorra", "--model", str(tiny_assets[0])]) == 4
    assert "did you mean 'lora'?" in capsys.readouterr().err


# -- hub id with no network ----------------------------------------------------------------------
def test_hub_id_offline_uses_the_registry_copy_or_fails_in_one_line(monkeypatch, tmp_path, capsys):
    from deltatune.models import MODELS, ModelError, registry

    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(registry, "offline_reason", lambda: "test: no network")
    local = registry.local_dir(MODELS["smollm2-135m-instruct"])
    local.mkdir(parents=True)
    (local / "config.json").write_text(json.dumps({"model_type": "llama"}))
    source, spec = registry.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert Path(source) == local and spec is MODELS["smollm2-135m-instruct"]
    assert "using the registry's offline copy" in capsys.readouterr().out
    monkeypatch.setattr(registry, "hub_cache_folder", lambda repo: None)
    started = time.time()
    with pytest.raises(ModelError, match="the hub is not reachable") as err:
        registry.load_config("nobody/no-such-model")
    assert time.time() - started < 5 and "\n" not in str(err.value)


def test_unreachable_reason_is_quick_and_true():
    from deltatune.models.reach import unreachable_reason

    unreachable_reason.cache_clear()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert unreachable_reason(f"http://127.0.0.1:{port}", 2.0) is None
    unreachable_reason.cache_clear()
    started = time.time()
    assert "unreachable" in unreachable_reason(f"http://127.0.0.1:{port}", 2.0)  # closed now
    assert time.time() - started < 3


# -- interactive infer ---------------------------------------------------------------------------
def test_infer_without_prompt_answers_each_stdin_line(zh_run, monkeypatch, capsys):
    model_dir, out = zh_run
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好吗\n\n今天天气怎么样\n"))
    assert main(["infer", "--model", str(model_dir), "--adapter", str(out / "adapter"), "--max-new-tokens", "2"]) == 0
    text = capsys.readouterr().out
    assert text.count("assistant:") == 2 and "user:      今天天气怎么样" in text
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["infer", "--model", str(model_dir)]) == 4
    assert "no prompt on standard input" in capsys.readouterr().err


def test_chat_repl_keeps_the_conversation_and_history(zh_run, tmp_path, monkeypatch):
    from deltatune.cli import chat as chat_module
    from deltatune.models import load_model, load_tokenizer

    model_dir, _ = zh_run
    model, tokenizer = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    seen = []
    real = chat_module.__dict__.get("generate_answers")
    assert real is None  # imported inside chat(): patch where it is looked up

    import deltatune.train.evaluate as evaluate

    original = evaluate.generate_answers

    def spy(model, tokenizer, prompts, **kwargs):
        seen.append([dict(m) for m in prompts[0]])
        return original(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(evaluate, "generate_answers", spy)
    lines = iter(["你好吗", "你叫什么名字", "/reset", "你喜欢什么", "/exit"])
    history = tmp_path / "history"
    n = chat_module.chat(model, tokenizer, max_new_tokens=2, interactive=True, read=lambda _: next(lines),
                         history=history, stdout=io.StringIO())  # fmt: skip
    assert n == 3
    assert [len(c) for c in seen] == [1, 3, 1]  # the second turn sees the first; /reset starts over
    try:
        import readline  # noqa: F401
    except ImportError:
        return
    assert history.is_file()


# -- progress for long evaluations ---------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_evaluation_shows_progress_on_a_terminal(zh_run, monkeypatch):
    from deltatune.data import encode_rows
    from deltatune.models import load_model, load_tokenizer
    from deltatune.train.evaluate import evaluate_loss

    model_dir, _ = zh_run
    model, tokenizer = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in ZH_ROWS]
    examples, _ = encode_rows(tokenizer, rows[:6], max_length=128)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    evaluate_loss(model, examples, batch_size=2, pad_id=tokenizer.pad_token_id)
    assert "held-out loss" in terminal.getvalue()
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    evaluate_loss(model, examples, batch_size=2, pad_id=tokenizer.pad_token_id, progress=False)
    assert quiet.getvalue() == ""


def test_fingerprint_sampling_stays_in_bounds_for_large_embeddings():
    """SmolLM2's embedding has 28,311,552 values; float32 linspace rounded the last index past the end."""
    import torch

    from deltatune.io.provenance import _sample

    big = torch.zeros(49152 * 576, dtype=torch.int8)
    big[-1] = 7
    assert _sample(big)[-1] == 7.0


def test_the_demo_reports_its_own_timings(capsys):
    from deltatune import demo

    started = time.process_time()
    demo.main()
    text = capsys.readouterr().out
    assert "identical logits = True" in text and "tour:" in text and "s CPU" in text
    assert time.process_time() - started < 20  # the tour itself; the README quotes ~7 s with the imports

"""Known failures get their own exit status and a message that names the file or step and the fix:
disk full in a checkpoint, a non-finite merge, a chat template leaving the sandbox, out of memory,
and rejected data (whose whole per-reason report is printed)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from train_helpers import sft_flags, synthetic_rows

from deltatune.cli.main import main


def _last_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("deltatune:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


def test_disk_full_during_a_checkpoint(tiny_assets, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    from deltatune.io import peft_format

    real = peft_format.save_file

    def full_at_step_3(tensors, path, metadata=None):
        if ".tmp-step-3-" in str(path):
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(peft_format, "save_file", full_at_step_3)
    out = tmp_path / "run"
    assert main(sft_flags(*tiny_assets, out)) == 12
    line = _last_error(capsys.readouterr().err)
    assert "could not write checkpoint step-3" in line and "no space left" in line and "--resume" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == []  # no half-written checkpoint


@pytest.fixture(scope="module")
def exploding_adapter(tiny_assets, tmp_path_factory):
    """A LoRA adapter whose values are finite but whose merged weights overflow to inf."""
    from transformers import AutoModelForCausalLM

    import deltatune as dt

    model_dir, _ = tiny_assets
    tuned = dt.get_tuned_model(
        AutoModelForCausalLM.from_pretrained(model_dir), dt.LoraConfig(r=2, target_modules=["q_proj"])
    )
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_" in name:
                param.fill_(1e30)
    folder = tmp_path_factory.mktemp("exploding") / "adapter"
    tuned.save_pretrained(folder)
    return folder


def test_non_finite_merge_is_refused(tiny_assets, exploding_adapter, tmp_path, capsys):
    model_dir, _ = tiny_assets
    code = main(["export", "--model", str(model_dir), "--adapter", str(exploding_adapter),
                 "--output-dir", str(tmp_path / "merged"), "--merge"])  # fmt: skip
    assert code == 13
    line = _last_error(capsys.readouterr().err)
    assert "merge refused" in line and "drop --merge" in line
    assert not (tmp_path / "merged").exists()


def test_chat_template_leaving_the_sandbox(tiny_assets, tmp_path, capsys):
    model_dir, _ = tiny_assets
    hostile = tmp_path / "hostile-model"
    shutil.copytree(model_dir, hostile)
    config = json.loads((hostile / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (hostile / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in hostile.glob("chat_template.j*"):
        extra.write_text(config["chat_template"])
    code = main(["infer", "--model", str(hostile), "--prompt", "hi", "--max-new-tokens", "2"])
    assert code == 14
    line = _last_error(capsys.readouterr().err)
    assert "sandbox" in line and "__class__" in line and "chat template" in line


def test_out_of_memory(tiny_assets, monkeypatch, capsys):
    from deltatune.train import evaluate

    def oom(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(evaluate, "generate_answers", oom)
    model_dir, _ = tiny_assets
    assert main(["infer", "--model", str(model_dir), "--prompt", "hi"]) == 15
    line = _last_error(capsys.readouterr().err)
    assert "out of memory" in line and "--batch-size" in line


# -- data ------------------------------------------------------------------------------------------
def _sft_on(tiny_assets, data, out, *extra):
    model_dir, _ = tiny_assets
    flags = sft_flags(model_dir, data, out, *extra)
    flags[flags.index("--max-steps") + 1] = "1"
    return main(flags)


def test_rejected_data_prints_the_whole_report(tiny_assets, tmp_path, capsys):
    data = tmp_path / "broken.jsonl"
    data.write_bytes(b'{"messages": [\n{not json}\n' + b'{"messages": "\xff\xfe"}\n')
    assert _sft_on(tiny_assets, data, tmp_path / "run") == 5
    err = capsys.readouterr().err
    assert f"no valid rows in {data}" in err
    assert "malformed_json: 2" in err and f"{data}:1" in err and f"{data}:2" in err
    assert f"non_utf8: 1  e.g. {data}:3:15" in err


def test_max_bad_fraction_flag(tiny_assets, tmp_path, capsys):
    data = tmp_path / "mostly-good.jsonl"
    rows = synthetic_rows(40) + [{"messages": [{"role": "user", "content": "and?"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _sft_on(tiny_assets, data, tmp_path / "a", "--val-size", "4", "--max-bad-fraction", "0") == 5
    err = capsys.readouterr().err
    assert "max_bad_fraction=0" in err and f"no_assistant_turn: 1  e.g. {data}:41" in err
    assert _sft_on(tiny_assets, data, tmp_path / "b", "--val-size", "4") == 0


def test_a_chat_ending_with_the_user_turn_is_invalid(tmp_path):
    from deltatune.data import load_rows

    data = tmp_path / "chats.jsonl"
    good = synthetic_rows(3)
    trailing = {"messages": [*good[0]["messages"], {"role": "user", "content": "and now?"}]}
    data.write_text("".join(json.dumps(r) + "\n" for r in [*good, trailing]))
    rows, report = load_rows(str(data))
    assert len(rows) == 3
    assert report.reasons == {"ends_with_user_turn": 1}
    assert report.examples["ends_with_user_turn"] == [f"{data}:4 (messages[2] (the last turn) is a user turn)"]


def test_out_of_memory_in_training_names_the_step(tiny_assets, tmp_path, monkeypatch, capsys):
    from deltatune.train import loop

    real, calls = loop._clip, []

    def oom_on_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_clip", oom_on_step_2)
    assert main(sft_flags(*tiny_assets, tmp_path / "run")) == 15
    line = _last_error(capsys.readouterr().err)
    assert "out of memory (at step 2 of 6: CUDA out of memory" in line and "--batch-size" in line

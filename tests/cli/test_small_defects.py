"""Smaller things a first user hits: a warning printed twice, an adapter name with a dot, and a
tokenizer load that could prompt on the terminal."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.cli.main import main


@pytest.fixture(scope="module")
def saved_adapter(tiny_assets, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model_dir, _ = tiny_assets
    tuned = dt.get_tuned_model(
        AutoModelForCausalLM.from_pretrained(model_dir), dt.LoraConfig(r=2, target_modules=["q_proj"])
    )
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    tuned.save_pretrained(folder)
    return model_dir, folder


def test_infer_warns_once_about_unknown_config_keys(saved_adapter, tmp_path):
    import shutil

    model_dir, folder = saved_adapter
    adapter = tmp_path / "adapter"
    shutil.copytree(folder, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["some_future_field"] = 1
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert main(["infer", "--model", str(model_dir), "--adapter", str(adapter), "--prompt", "hi",
                     "--max-new-tokens", "1"]) == 0  # fmt: skip
    unknown = [w for w in record if "some_future_field" in str(w.message)]
    assert len(unknown) == 1, [str(w.message) for w in unknown]


@pytest.mark.parametrize("name", ["v1.0", "a.b"])
def test_adapter_names_with_dots_are_refused_up_front(saved_adapter, name):
    from transformers import AutoModelForCausalLM

    model_dir, folder = saved_adapter
    tuned = dt.get_tuned_model(
        AutoModelForCausalLM.from_pretrained(model_dir), dt.LoraConfig(r=2, target_modules=["q_proj"])
    )
    with pytest.raises(dt.ConfigError, match=r"invalid adapter name .*'\.'"):
        tuned.add_adapter(name, dt.LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(dt.ConfigError, match="invalid adapter name"):
        tuned.load_adapter(folder, adapter_name=name)
    with pytest.raises(dt.ConfigError, match="invalid adapter name"):
        dt.TunedModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), folder, adapter_name=name)
    tuned.add_adapter("v1_0", dt.LoraConfig(r=2, target_modules=["v_proj"]))  # the documented alternative
    assert "v1_0" in tuned.peft_config


def test_prompt_tuning_text_init_never_trusts_remote_code(tiny_assets, monkeypatch):
    import transformers

    model_dir, _ = tiny_assets
    seen = {}
    real = transformers.AutoTokenizer.from_pretrained

    def record(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record)
    config = dt.PromptTuningConfig(
        num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="add one and two",
        tokenizer_name_or_path=str(model_dir), tokenizer_kwargs={"trust_remote_code": True},
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    dt.get_tuned_model(model, config)
    assert seen.get("trust_remote_code") is False
    assert torch.is_grad_enabled()

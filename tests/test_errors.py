"""Bad input fails early with a message that names the problem; a failed load changes nothing."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS, build_tiny

LLAMA = TINY_MODELS["llama"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be an integer >= 1"),
        ({"r": -3}, "r must be an integer >= 1"),
        ({"lora_dropout": 1.5}, r"lora_dropout must be in \[0, 1\)"),
        ({"lora_dropout": -0.1}, r"lora_dropout must be in \[0, 1\)"),
        ({"bias": "some"}, "bias must be"),
        ({"init_lora_weights": "magic"}, "init_lora_weights must be"),
        ({"task_type": "CAUSAL"}, "task_type='CAUSAL' is unknown"),
        ({"target_modules": "q_proj[", "r": 2}, "not a valid regular expression"),
        ({"layers_pattern": "layers"}, "layers_pattern only applies"),
    ],
)
def test_invalid_config_values_are_refused(kwargs, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.LoraConfig(**kwargs)


def test_unknown_tuner_name_lists_known_ones():
    with pytest.raises(dt.ConfigError, match="unknown tuner 'loraa'.*lora"):
        dt.get_spec("loraa")


@pytest.mark.parametrize("name", ["../x", "a/b", "", " x", "-x", "x" * 65, "é"])
def test_unsafe_adapter_names_are_refused(name):
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(dt.ConfigError, match="invalid adapter name"):
        tuned.add_adapter(name, dt.LoraConfig(target_modules=["v_proj"]))


def test_wrapping_twice_is_refused():
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(dt.ConfigError, match="already wrapped"):
        dt.get_tuned_model(tuned, dt.LoraConfig(target_modules=["v_proj"]))
    with pytest.raises(dt.ConfigError, match="already wrapped"):
        dt.get_tuned_model(tuned.get_base_model(), dt.LoraConfig(target_modules=["v_proj"]))


def test_duplicate_adapter_name_is_refused():
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(dt.ConfigError, match="already exists"):
        tuned.add_adapter("default", dt.LoraConfig(target_modules=["v_proj"]))


@pytest.fixture
def saved(tmp_path):
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    contract.perturb(tuned)
    tuned.save_pretrained(tmp_path)
    return tmp_path


def _load_fails(path, error, match, model=None):
    model = model or build_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [type(m) for m in model.modules()]
    with pytest.raises(error, match=match):
        dt.TunedModel.from_pretrained(model, path)
    assert [type(m) for m in model.modules()] == types_before, "a failed load left wrappers behind"
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"a failed load changed {key}"


def _rewrite_tensors(path, edit):
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


def test_missing_directory_and_files(tmp_path, saved):
    _load_fails(tmp_path / "nope", dt.AdapterFileError, "does not exist")
    (saved / "adapter_config.json").unlink()
    _load_fails(saved, dt.AdapterFileError, "adapter_config.json is missing")


def test_missing_weights_and_pickle_only(saved):
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    _load_fails(saved, dt.AdapterFileError, "never unpickles")


def test_truncated_safetensors(saved):
    path = saved / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    _load_fails(saved, dt.AdapterFileError, "not a readable safetensors file")


def test_missing_keys(saved):
    _rewrite_tensors(saved, lambda t: t.pop(next(k for k in t if "lora_A" in k)))
    _load_fails(saved, dt.AdapterLoadError, "missing keys")


def test_unexpected_keys(saved):
    _rewrite_tensors(saved, lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", torch.ones(4, 16)))
    _load_fails(saved, dt.AdapterLoadError, "unexpected keys")


def test_nan_values(saved):
    def poison(tensors):
        key = next(k for k in tensors if "lora_B" in k)
        tensors[key][0, 0] = float("nan")

    _rewrite_tensors(saved, poison)
    _load_fails(saved, dt.AdapterFileError, "NaN")


def test_empty_tensor(saved):
    _rewrite_tensors(saved, lambda t: t.__setitem__(next(k for k in t if "lora_B" in k), torch.ones(0, 4)))
    _load_fails(saved, dt.AdapterFileError, "empty")


def test_adapter_for_another_base_names_key_and_both_shapes(saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    _load_fails(saved, dt.AdapterLoadError, r"lora_A.weight' has shape \(4, 16\) in the file but \(4, 32\) in the model", model=wider)


def test_config_problems_fail_before_weights_load(saved):
    config_path = saved / "adapter_config.json"
    data = json.loads(config_path.read_text())
    for edit, message in [
        ({"r": 0}, "r must be an integer >= 1"),
        ({"r": "8"}, "field r of LoraConfig must be int"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"peft_type": "NOPE"}, "peft_type='NOPE' is not supported"),
        ({"use_qalora": True}, "peft feature deltatune does not implement"),
    ]:
        config_path.write_text(json.dumps({**data, **edit}))
        (saved / "deltatune_config.json").unlink(missing_ok=True)
        _load_fails(saved, dt.ConfigError, message)
    config_path.write_text(json.dumps({k: v for k, v in data.items() if k != "peft_type"}))
    _load_fails(saved, dt.ConfigError, "no 'peft_type'")
    config_path.write_text("{not json")
    _load_fails(saved, dt.AdapterFileError, "not valid JSON")


def test_unknown_config_keys_give_one_warning(saved):
    config_path = saved / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "future_field": 1, "other_new": 2}))
    with pytest.warns(UserWarning, match=r"ignoring unknown LoraConfig keys \['future_field', 'other_new'\]"):
        dt.TunedModel.from_pretrained(build_tiny("llama"), saved)


def test_config_json_round_trip():
    config = dt.LoraConfig(target_modules=["q_proj"], r=16, lora_alpha=32, use_dora=True, rank_pattern={"q": 4})
    again = dt.LoraConfig.from_dict(json.loads(config.to_json()))
    assert again == config


def test_saving_over_a_file_is_refused(tmp_path):
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["q_proj"]))
    (tmp_path / "f").write_text("x")
    with pytest.raises(dt.ConfigError, match="is a file"):
        tuned.save_pretrained(tmp_path / "f")


def test_saves_are_atomic_no_temp_files_left(tmp_path, monkeypatch):
    import deltatune.io.peft_format as fmt

    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["q_proj"]))
    tuned.save_pretrained(tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fmt, "save_file", full_disk)
    contract.perturb(tuned)
    with pytest.raises(OSError, match="No space left"):
        tuned.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "deltatune_config.json"]


def test_load_adapter_failure_keeps_existing_adapters(saved):
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["q_proj"]))
    contract.perturb(tuned)
    out = contract.run(LLAMA, tuned)
    _rewrite_tensors(saved, lambda t: t.pop(next(iter(t))))
    with pytest.raises(dt.AdapterLoadError):
        tuned.load_adapter(saved, "broken")
    assert list(tuned.adapters) == ["default"]
    torch.testing.assert_close(contract.run(LLAMA, tuned), out, atol=0, rtol=0)


def test_failed_from_pretrained_restores_requires_grad(saved):
    _rewrite_tensors(saved, lambda t: t.pop(next(iter(t))))
    model = build_tiny("llama")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(dt.AdapterLoadError):
        dt.TunedModel.from_pretrained(model, saved)
    assert all(p.requires_grad for p in model.parameters())


def test_pissa_adapter_warns_on_load(tmp_path):
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa"))
    tuned.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="residual base"):
        dt.TunedModel.from_pretrained(build_tiny("llama"), tmp_path)

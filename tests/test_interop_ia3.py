"""(IA)^3 and LN-tuning adapters cross between deltatune and the real `peft` package unchanged."""

import warnings

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS

peft = pytest.importorskip("peft")

# (target_modules, feedforward_modules) per tiny model: attention outputs scaled, one FFN input scaled.
IA3_TARGETS = {
    "llama": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "c_fc"], ["c_fc"]),  # GPT-2 Conv1D: fan_in_fan_out
    "bert": (["query", "value", "intermediate.dense"], ["intermediate.dense"]),
    "t5": (["q", "v", "wo"], ["wo"]),
}
LN_MODELS = ["llama", "gpt2", "bert", "t5"]


def _no_key_warnings(record) -> None:
    for w in record:
        text = str(w.message).lower()
        assert "missing" not in text and "unexpected" not in text, text


def _perturb_peft(model, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def _ours_to_peft(tmp_path, tiny, config) -> None:
    base_out = contract.run(tiny, tiny.fresh())
    tuned = dt.get_tuned_model(tiny.fresh(), config)
    contract.perturb(tuned)
    ours = contract.assert_changes_output(tiny, tuned, base_out)
    tuned.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(tiny.fresh(), tmp_path).eval()
    _no_key_warnings(record)
    torch.testing.assert_close(contract.run(tiny, theirs), ours, atol=1e-5, rtol=0)


def _peft_to_ours(tmp_path, tiny, peft_config) -> None:
    base_out = contract.run(tiny, tiny.fresh())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about Conv1D fan_in_fan_out and unknown norm classes
        theirs = peft.get_peft_model(tiny.fresh(), peft_config)
    _perturb_peft(theirs)
    expected = contract.run(tiny, theirs.eval())
    assert (expected - base_out).abs().max() > 1e-4, "the perturbed peft adapter does not change the output"
    theirs.save_pretrained(tmp_path)
    ours = dt.TunedModel.from_pretrained(tiny.fresh(), tmp_path)
    torch.testing.assert_close(contract.run(tiny, ours), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_name", list(IA3_TARGETS))
def test_ia3_deltatune_adapter_loads_in_peft(tmp_path, model_name):
    tiny = TINY_MODELS[model_name]
    targets, ff = IA3_TARGETS[model_name]
    config = dt.IA3Config(target_modules=targets, feedforward_modules=ff, task_type=tiny.task_type)
    _ours_to_peft(tmp_path, tiny, config)


@pytest.mark.parametrize("model_name", list(IA3_TARGETS))
def test_ia3_peft_adapter_loads_in_deltatune(tmp_path, model_name):
    tiny = TINY_MODELS[model_name]
    targets, ff = IA3_TARGETS[model_name]
    config = peft.IA3Config(target_modules=targets, feedforward_modules=ff, task_type=tiny.task_type)
    _peft_to_ours(tmp_path, tiny, config)


def test_ia3_keys_and_shapes_are_peft_layout(tmp_path):
    tiny = TINY_MODELS["llama"]
    tuned = dt.get_tuned_model(
        tiny.fresh(), dt.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    tuned.save_pretrained(tmp_path)
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.ia3_l"] == (16, 1)  # output scaling: (out, 1)
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.ia3_l"] == (1, 32)  # input scaling: (1, in)


def test_ia3_regex_and_all_linear_configs_load_in_peft(tmp_path):
    """Configs peft would read differently (all-linear with a suffix feedforward list) are written as exact names."""
    tiny = TINY_MODELS["llama"]
    config = dt.IA3Config(target_modules="all-linear", feedforward_modules=["down_proj"], task_type="CAUSAL_LM")
    _ours_to_peft(tmp_path / "a", tiny, config)
    config = dt.IA3Config(
        target_modules=r".*\.(q_proj|down_proj)", feedforward_modules=r".*down_proj", task_type="CAUSAL_LM"
    )
    _ours_to_peft(tmp_path / "b", tiny, config)


def test_ia3_merge_matches_peft_merge():
    """Merged weights and biases (output scaling scales the bias too) equal peft's."""
    tiny = TINY_MODELS["bert"]
    targets, ff = IA3_TARGETS["bert"]
    theirs = peft.get_peft_model(tiny.fresh(), peft.IA3Config(target_modules=targets, feedforward_modules=ff))
    _perturb_peft(theirs)
    ours = dt.get_tuned_model(tiny.fresh(), dt.IA3Config(target_modules=targets, feedforward_modules=ff))
    state = {
        k.replace(".ia3_l.default", ".deltas.default.ia3_l"): v for k, v in theirs.base_model.model.state_dict().items()
    }
    ours.model.load_state_dict(state, strict=False)
    merged_theirs = theirs.merge_and_unload().state_dict()
    merged_ours = ours.merge_and_unload().state_dict()
    assert merged_theirs.keys() == merged_ours.keys()
    for key, value in merged_theirs.items():
        torch.testing.assert_close(merged_ours[key], value, atol=1e-6, rtol=1e-6, msg=key)


@pytest.mark.parametrize("model_name", LN_MODELS)
def test_ln_tuning_deltatune_adapter_loads_in_peft(tmp_path, model_name):
    tiny = TINY_MODELS[model_name]
    _ours_to_peft(tmp_path, tiny, dt.LNTuningConfig(task_type=tiny.task_type))


@pytest.mark.parametrize("model_name", LN_MODELS)
def test_ln_tuning_peft_adapter_loads_in_deltatune(tmp_path, model_name):
    tiny = TINY_MODELS[model_name]
    norms = sorted({n.rsplit(".", 1)[-1] for n, m in tiny.fresh().named_modules() if "Norm" in type(m).__name__})
    _peft_to_ours(tmp_path, tiny, peft.LNTuningConfig(target_modules=norms, task_type=tiny.task_type))

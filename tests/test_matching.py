"""Target selection follows peft's rules, and bad targets fail with names that help."""

import warnings

import pytest

import deltatune as dt
from deltatune.core import matching
from deltatune.testing.tiny_models import build_tiny

NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.1.mlp.down_proj",
    "lm_head",
]


def _cfg(**kw):
    return dt.LoraConfig(**kw)


def test_list_entries_match_exact_names_or_dotted_suffixes():
    match = matching.find_targets(NAMES, _cfg(target_modules=["q_proj", "lm_head", "mlp.down_proj"]))
    assert match.targets == [NAMES[0], NAMES[2], NAMES[4], NAMES[5]]
    # "proj" is not a suffix after a dot, so nothing ends with ".proj"
    assert matching.find_targets(NAMES, _cfg(target_modules=["proj"])).targets == []


def test_string_is_a_full_regex_match():
    assert matching.find_targets(NAMES, _cfg(target_modules=r".*\.q_proj")).targets == [NAMES[0], NAMES[2]]
    assert matching.find_targets(NAMES, _cfg(target_modules="q_proj")).targets == []


def test_exclude_modules_and_layer_selection():
    cfg = _cfg(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"])
    assert matching.find_targets(NAMES, cfg).targets == [NAMES[0], NAMES[2], NAMES[3]]
    cfg = _cfg(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers")
    assert matching.find_targets(NAMES, cfg).targets == [NAMES[2], NAMES[3]]
    cfg = _cfg(target_modules=["q_proj"], layers_to_transform=0)
    assert matching.find_targets(NAMES, cfg).targets == [NAMES[0]]


def test_all_linear_skips_the_output_head():
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules="all-linear"))
    targets = tuned.adapters["default"].targets
    assert "lm_head" not in targets
    assert {t.rsplit(".", 1)[-1] for t in targets} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert isinstance(tuned.peft_config["default"].target_modules, list)


def test_all_linear_covers_gpt2_conv1d():
    tuned = dt.get_tuned_model(build_tiny("gpt2"), dt.LoraConfig(target_modules="all-linear"))
    assert {t.rsplit(".", 1)[-1] for t in tuned.adapters["default"].targets} == {"c_attn", "c_proj", "c_fc"}
    assert tuned.peft_config["default"].fan_in_fan_out is True


def test_nothing_matched_lists_close_real_names():
    with pytest.raises(dt.ConfigError) as err:
        dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["q_prj"]))
    message = str(err.value)
    assert "matched no module" in message and "q_proj" in message and "Closest" in message


def test_partly_matching_list_warns_with_per_entry_counts():
    with pytest.warns(UserWarning, match=r"\['nope'\] matched no module") as record:
        dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["q_proj", "nope"]))
    assert "'q_proj'" in str(record[0].message) and "2" in str(record[0].message)


def test_target_of_unsupported_kind_is_refused():
    with pytest.raises(dt.ConfigError, match="supports layer kinds"):
        dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["input_layernorm"]))


def test_second_adapter_sees_the_same_names():
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=r".*\.q_proj"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuned.add_adapter("b", dt.LoraConfig(target_modules=r".*proj"))
    targets = tuned.adapters["b"].targets
    assert all(".base_layer" not in t and ".deltas" not in t for t in targets)
    assert len([t for t in targets if t.endswith("q_proj")]) == 2

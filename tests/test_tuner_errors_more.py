"""Bad input to bottleneck adapters, ResTuning, side-tuning and LLaMA-Pro fails early, saying why."""

import pytest
import torch

import deltatune as dt
from deltatune.testing.tiny_models import build_tiny

IDS = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))


# -- ResTuning ------------------------------------------------------------------------------------------
def test_restuning_stem_modules_that_do_not_exist_name_the_field_and_real_modules():
    config = dt.ResTuningConfig(stem_modules=r".*\.blocks\.\d+", target_modules=r"model\.norm")
    with pytest.raises(dt.ConfigError, match=r"stem_modules=.*blocks.*matched no module.*'layers'.*'self_attn'"):
        dt.get_tuned_model(build_tiny("llama"), config)


def test_restuning_needs_stems_and_one_target():
    with pytest.raises(dt.ConfigError, match="stem_modules is not set"):
        dt.ResTuningConfig(target_modules=r"model\.norm")
    config = dt.ResTuningConfig(stem_modules=r"model\.layers\.\d+", target_modules=["input_layernorm"])
    with pytest.raises(dt.ConfigError, match=r"exactly one module.*model\.layers\.0\.input_layernorm"):
        dt.get_tuned_model(build_tiny("llama"), config)
    config = dt.ResTuningConfig(stem_modules=r"model\.layers\.\d+", target_modules=r"model\.layers\.1")
    with pytest.raises(dt.ConfigError, match="inside\\) the stem_modules"):
        dt.get_tuned_model(build_tiny("llama"), config)


def test_restuning_bad_fields():
    with pytest.raises(dt.ConfigError, match="tuner_cfg entry 'lora' is not supported"):
        dt.ResTuningConfig(stem_modules="x", tuner_cfg="lora")
    with pytest.raises(dt.ConfigError, match="target_modules_hook must be 'input' or 'output'"):
        dt.ResTuningConfig(stem_modules="x", target_modules_hook="middle")
    with pytest.raises(dt.ConfigError, match="every tuner 'zero'"):
        dt.ResTuningConfig(stem_modules="x", tuner_cfg="zero")
    with pytest.raises(dt.ConfigError, match="dims must all be equal"):
        dt.ResTuningConfig(stem_modules="x", dims=[16, 32])


def test_restuning_stems_that_run_after_the_target_are_refused_at_forward():
    config = dt.ResTuningConfig(stem_modules=r"model\.layers\.\d+", target_modules=r"model\.embed_tokens",
                                target_modules_hook="output")  # fmt: skip
    tuned = dt.get_tuned_model(build_tiny("llama"), config)
    with pytest.raises(RuntimeError, match="did not run before the target module"):
        tuned(input_ids=IDS)


# -- side-tuning ------------------------------------------------------------------------------------------
def test_side_tuning_refuses_modules_reading_token_ids():
    with pytest.raises(dt.ConfigError, match=r"cannot target 'model\.embed_tokens'.*token ids"):
        dt.get_tuned_model(build_tiny("llama"), dt.SideTuningConfig(target_modules=["embed_tokens"]))


def test_side_tuning_refuses_a_module_whose_output_it_cannot_map():
    """GPT-2's attention module returns a tuple (output, weights): the side network cannot blend with it."""
    tuned = dt.get_tuned_model(build_tiny("gpt2"), dt.SideTuningConfig(target_modules=r"transformer\.h\.1\.attn"))
    with pytest.raises(dt.ConfigError, match="returned a tuple.*float tensors with features last"):
        tuned(input_ids=IDS)


# -- LLaMA-Pro --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tiny", ["gpt2", "mlp"])
def test_llama_pro_needs_a_llama_style_layer_list(tiny):
    with pytest.raises(dt.ConfigError, match="LLaMA-Pro expands a Llama-style decoder-layer list.*has none"):
        dt.get_tuned_model(build_tiny(tiny), dt.LlamaProConfig(num_new_blocks=1))


def test_llama_pro_bad_fields():
    with pytest.raises(dt.ConfigError, match="exceeds the 2 decoder blocks"):
        dt.get_tuned_model(build_tiny("llama"), dt.LlamaProConfig(num_new_blocks=3))
    with pytest.raises(dt.ConfigError, match="takes no target_modules"):
        dt.LlamaProConfig(target_modules=["q_proj"])
    with pytest.raises(dt.ConfigError, match="num_new_blocks must be an integer >= 1"):
        dt.LlamaProConfig(num_new_blocks=0)


def test_llama_pro_after_another_adapter_is_refused_and_leaves_the_model_as_it_was():
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(dt.ConfigError, match="add LLaMA-Pro before other adapters"):
        tuned.add_adapter("pro", dt.LlamaProConfig(num_new_blocks=1))
    assert len(tuned.model.model.layers) == 2 and tuned.config.num_hidden_layers == 2


# -- bottleneck adapters -------------------------------------------------------------------------------------
def test_adapter_bad_fields():
    with pytest.raises(dt.ConfigError, match="adapter_type must be one of"):
        dt.AdapterConfig(adapter_type="serial")
    with pytest.raises(dt.ConfigError, match="non_linearity must be one of"):
        dt.AdapterConfig(non_linearity="softmax")
    with pytest.raises(dt.ConfigError, match="bottleneck_size must be an integer >= 1"):
        dt.AdapterConfig(bottleneck_size=0)


def test_adapter_default_targets_follow_roles():
    houlsby = dt.get_tuned_model(build_tiny("llama"), dt.AdapterConfig())
    assert [t.rsplit(".", 1)[1] for t in houlsby.adapters["default"].targets] == ["o_proj", "down_proj"] * 2
    pfeiffer = dt.get_tuned_model(build_tiny("bert"), dt.AdapterConfig(adapter_type="pfeiffer"))
    assert pfeiffer.adapters["default"].targets == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]


@pytest.mark.parametrize(
    "config",
    [dt.AdapterConfig(), dt.SideTuningConfig(target_modules=["model.norm"]), dt.LlamaProConfig()],
    ids=["adapter", "side_tuning", "llama_pro"],
)
def test_nonlinear_and_structural_adapters_refuse_to_merge(config):
    tuned = dt.get_tuned_model(build_tiny("llama"), config)
    with pytest.raises(dt.MergeError, match="cannot be merged into the base weights"):
        tuned.merge_and_unload()
    assert tuned.adapters, "a refused merge unloaded the adapter"

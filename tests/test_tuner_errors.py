"""Bad input to the IA3 and "select" tuners fails early, naming the field and the real names to use."""

import pytest
import torch

import deltatune as dt
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS, build_tiny


# -- IA3 ----------------------------------------------------------------------------------------------
def test_ia3_feedforward_not_subset_of_targets():
    with pytest.raises(dt.ConfigError, match=r"feedforward_modules must be a subset of target_modules.*'up_proj'"):
        dt.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj", "up_proj"])


def test_ia3_feedforward_regex_matching_no_target():
    config = dt.IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=r".*down_proj")
    with pytest.raises(dt.ConfigError, match=r"feedforward_modules entry .* matches none of the targets.*q_proj"):
        dt.get_tuned_model(build_tiny("llama"), config)


def test_ia3_bad_field_types():
    with pytest.raises(dt.ConfigError, match="feedforward_modules must be"):
        dt.IA3Config(target_modules=["q_proj"], feedforward_modules=[""])
    with pytest.raises(dt.ConfigError, match="not a valid regular expression"):
        dt.IA3Config(target_modules=["q_proj"], feedforward_modules="(")
    with pytest.raises(dt.ConfigError, match="init_ia3_weights"):
        dt.IA3Config(target_modules=["q_proj"], init_ia3_weights="yes")


def test_ia3_refuses_embedding_targets():
    with pytest.raises(dt.ConfigError, match=r"embed_tokens.*supports layer kinds \['linear', 'conv'\]"):
        dt.get_tuned_model(build_tiny("llama"), dt.IA3Config(target_modules=["embed_tokens"]))


def test_ia3_zero_vector_cannot_unmerge():
    tiny = TINY_MODELS["mlp"]
    tuned = dt.get_tuned_model(tiny.fresh(), dt.IA3Config(target_modules=["lin0"]))
    with torch.no_grad():
        tuned.model.lin0.deltas["default"].ia3_l[0] = 0.0
    tuned.merge_adapter()
    merged = tuned.model.lin0.base_layer.weight.detach().clone()
    with pytest.raises(dt.MergeError, match="zero entry"):
        tuned.unmerge_adapter()
    assert torch.equal(tuned.model.lin0.base_layer.weight, merged), "a refused unmerge changed the weight"


# -- select tuners ------------------------------------------------------------------------------------
def test_part_regex_matching_nothing_lists_parameter_names():
    with pytest.raises(dt.ConfigError, match=r"matched no parameter.*'lin0\.weight'.*whole dotted name"):
        dt.get_tuned_model(build_tiny("mlp"), dt.PartConfig(target_parameters=r"lin9\..*"))


def test_part_needs_a_valid_pattern():
    with pytest.raises(dt.ConfigError, match="target_parameters is not set"):
        dt.PartConfig()
    with pytest.raises(dt.ConfigError, match="not a valid regular expression"):
        dt.PartConfig(target_parameters="lin0.(")


def test_bitfit_on_a_model_without_biases_suggests_alternatives():
    with pytest.raises(dt.ConfigError, match="no bias parameter.*LNTuningConfig or PartConfig"):
        dt.get_tuned_model(build_tiny("llama"), dt.BitFitConfig())


def test_bitfit_target_modules_matching_no_bias_lists_biases():
    with pytest.raises(dt.ConfigError, match=r"no bias parameter in target_modules=\['nothing'\].*'lin0\.bias'"):
        dt.get_tuned_model(build_tiny("mlp"), dt.BitFitConfig(target_modules=["nothing"]))


def test_ln_tuning_without_norm_layers_says_so():
    with pytest.raises(dt.ConfigError, match="LN-tuning selected no parameter.*Norm layers in this model: none"):
        dt.get_tuned_model(build_tiny("mlp"), dt.LNTuningConfig())


def test_full_refuses_parameters_of_non_leaf_modules_and_names_the_fix():
    """ViT's cls_token is held by the embeddings module itself, which has submodules."""
    tiny = TINY_MODELS["vit"]
    with pytest.raises(dt.ConfigError, match=r"cls_token.*exclude_modules=\['vit\.embeddings'\]"):
        dt.get_tuned_model(tiny.fresh(), dt.FullConfig())
    base_out = contract.run(tiny, tiny.fresh())
    tuned = dt.get_tuned_model(tiny.fresh(), dt.FullConfig(exclude_modules=["vit.embeddings"]))
    contract.perturb(tuned)
    contract.assert_changes_output(tiny, tuned, base_out)


def test_select_on_a_module_another_adapter_trains_in_full():
    tuned = dt.get_tuned_model(build_tiny("mlp"), dt.LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
    with pytest.raises(dt.ConfigError, match="'head'.*modules_to_save"):
        tuned.add_adapter("b", dt.BitFitConfig())
    assert set(tuned.adapters) == {"default"}
    tuned.add_adapter("b", dt.BitFitConfig(modules_to_save=["head"]))  # the stated fix works


def test_select_config_rejects_unknown_file_type(tmp_path):
    tuned = dt.get_tuned_model(build_tiny("mlp"), dt.BitFitConfig())
    tuned.save_pretrained(tmp_path)
    (tmp_path / "deltatune_config.json").unlink()  # without our sidecar, peft_type BITFIT is still ours
    loaded = dt.TunedModel.from_pretrained(build_tiny("mlp"), tmp_path)
    assert isinstance(loaded.peft_config["default"], dt.BitFitConfig)

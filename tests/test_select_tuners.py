"""Engine behaviour of "select" tuners beyond the contract matrix: mixing with delta tuners, tied tensors."""

import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS


def test_bitfit_and_lora_on_the_same_layers_compose_and_merge_exactly():
    tiny = TINY_MODELS["mlp"]
    base_out = contract.run(tiny, tiny.fresh())
    tuned = dt.get_tuned_model(tiny.fresh(), dt.LoraConfig(target_modules=["lin0", "lin1"], r=2), adapter_name="lora")
    tuned.add_adapter("bitfit", dt.BitFitConfig())
    tuned.set_adapter(["lora", "bitfit"])
    contract.perturb(tuned)
    weights = contract.base_state(tuned.model)
    both = contract.assert_changes_output(tiny, tuned, base_out)
    for order in (["lora", "bitfit"], ["bitfit", "lora"]):  # a later replacing merge goes under the LoRA merge
        for name in order:
            tuned.merge_adapter([name])
        torch.testing.assert_close(contract.run(tiny, tuned), both, atol=1e-5, rtol=0)
        tuned.unmerge_adapter()
        for key, value in tuned.model.state_dict().items():
            torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0, msg=key)
    with tuned.disable_adapter():  # LoRA's merge round trip leaves float rounding in the weights
        torch.testing.assert_close(contract.run(tiny, tuned), base_out, atol=1e-6, rtol=0)


def test_full_trains_a_tied_tensor_once_and_saves_it_once(tmp_path):
    tiny = TINY_MODELS["gpt2"]  # lm_head.weight is transformer.wte.weight
    model = tiny.fresh()
    tuned = dt.get_tuned_model(model, dt.FullConfig())
    copies = tuned.model.lm_head.deltas["default"].overrides()["weight"]
    assert copies is tuned.model.transformer.wte.deltas["default"].overrides()["weight"]
    trainable, _ = tuned.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in tiny.fresh().parameters())  # tied counted once
    tuned.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.transformer.wte.weight" in keys and "base_model.model.lm_head.weight" not in keys
    contract.perturb(tuned)
    expected = contract.run(tiny, tuned)
    tuned.save_pretrained(tmp_path)
    loaded = dt.TunedModel.from_pretrained(tiny.fresh(), tmp_path)
    torch.testing.assert_close(contract.run(tiny, loaded), expected, atol=1e-5, rtol=0)


def test_part_on_one_holder_of_a_tied_tensor_trains_it_everywhere():
    tiny = TINY_MODELS["gpt2"]
    tuned = dt.get_tuned_model(tiny.fresh(), dt.PartConfig(target_parameters="lm_head.weight"))
    assert sorted(tuned.adapters["default"].targets) == ["lm_head.weight", "transformer.wte.weight"]
    assert set(tuned.adapter_state_dict()) == {"transformer.wte.weight"}

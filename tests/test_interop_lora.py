"""LoRA / DoRA / rsLoRA adapters cross between deltatune and the real `peft` package unchanged."""

import warnings

import pytest
import torch

import deltatune as dt
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS

peft = pytest.importorskip("peft")

VARIANTS = {
    "lora": {"r": 4, "lora_alpha": 8},
    "dora": {"r": 4, "lora_alpha": 8, "use_dora": True},
    "rslora": {"r": 4, "lora_alpha": 16, "use_rslora": True},
}
MODELS = ["llama", "gpt2", "bert", "t5"]
CASES = [pytest.param(m, v, id=f"{m}-{v}") for m in MODELS for v in VARIANTS]


def _targets(tiny):
    return tiny.targets["linear"]


def _fail_on_key_warnings(record):
    for w in record:
        text = str(w.message).lower()
        assert "missing" not in text and "unexpected" not in text and "unexpected keyword" not in text, text


@pytest.mark.parametrize(("model_name", "variant"), CASES)
def test_deltatune_adapter_loads_in_peft(tmp_path, model_name, variant):
    tiny = TINY_MODELS[model_name]
    config = dt.LoraConfig(target_modules=_targets(tiny), task_type=tiny.task_type, **VARIANTS[variant])
    base_out = contract.run(tiny, tiny.fresh())
    tuned = dt.get_tuned_model(tiny.fresh(), config)
    contract.perturb(tuned)
    ours = contract.assert_changes_output(tiny, tuned, base_out)
    tuned.save_pretrained(tmp_path)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(tiny.fresh(), tmp_path).eval()
    _fail_on_key_warnings(record)
    torch.testing.assert_close(contract.run(tiny, theirs), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("model_name", "variant"), CASES)
def test_peft_adapter_loads_in_deltatune(tmp_path, model_name, variant):
    tiny = TINY_MODELS[model_name]
    base_out = contract.run(tiny, tiny.fresh())
    config = peft.LoraConfig(target_modules=_targets(tiny), task_type=tiny.task_type, **VARIANTS[variant])
    theirs = peft.get_peft_model(tiny.fresh(), config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _name, param in theirs.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    theirs.eval()
    expected = contract.run(tiny, theirs)
    assert (expected - base_out).abs().max() > 1e-4
    theirs.save_pretrained(tmp_path)

    ours = dt.TunedModel.from_pretrained(tiny.fresh(), tmp_path)
    torch.testing.assert_close(contract.run(tiny, ours), expected, atol=1e-5, rtol=0)


def test_multi_adapter_directory_layout_matches_peft(tmp_path):
    tiny = TINY_MODELS["llama"]
    tuned = dt.get_tuned_model(tiny.fresh(), dt.LoraConfig(target_modules=["q_proj"], r=2))
    tuned.add_adapter("other", dt.LoraConfig(target_modules=["v_proj"], r=3, use_dora=True))
    contract.perturb(tuned)
    tuned.set_adapter("other")
    contract.perturb(tuned, seed=5)
    expected_other = contract.run(tiny, tuned)
    tuned.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "other" / "adapter_config.json").is_file()

    theirs = peft.PeftModel.from_pretrained(tiny.fresh(), tmp_path)
    theirs.load_adapter(tmp_path / "other", adapter_name="other")
    theirs.set_adapter("other")
    torch.testing.assert_close(contract.run(tiny, theirs.eval()), expected_other, atol=1e-5, rtol=0)


def test_embedding_and_modules_to_save_roundtrip_with_peft(tmp_path):
    """peft saves a copy of a targeted embedding's base weight; we accept it only when it is unchanged."""
    tiny = TINY_MODELS["llama"]
    config = peft.LoraConfig(target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"], r=2)
    theirs = peft.get_peft_model(tiny.fresh(), config)
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(0.05)
    expected = contract.run(tiny, theirs.eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path)
    ours = dt.TunedModel.from_pretrained(tiny.fresh(), tmp_path)
    torch.testing.assert_close(contract.run(tiny, ours), expected, atol=1e-5, rtol=0)

    ours_path = tmp_path / "ours"
    ours.save_pretrained(ours_path)
    back = peft.PeftModel.from_pretrained(tiny.fresh(), ours_path).eval()
    torch.testing.assert_close(contract.run(tiny, back), expected, atol=1e-5, rtol=0)

    other_base = tiny.fresh(seed=7)
    with pytest.raises(dt.AdapterLoadError, match="overwrite base weights"):
        dt.TunedModel.from_pretrained(other_base, tmp_path)


def test_generate_matches_peft_greedy(tmp_path):
    tiny = TINY_MODELS["llama"]
    tuned = dt.get_tuned_model(tiny.fresh(), dt.LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    contract.perturb(tuned, scale=0.5)
    tuned.save_pretrained(tmp_path)
    prompt = tiny.make_inputs(0)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ours = tuned.generate(**prompt, **kwargs)
        theirs = peft.PeftModel.from_pretrained(tiny.fresh(), tmp_path).eval().generate(**prompt, **kwargs)
        with tuned.disable_adapter():
            base = tuned.generate(**prompt, **kwargs)
    assert ours.shape == (2, 7 + 8)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, base), "the adapter does not change greedy output (vacuous)"

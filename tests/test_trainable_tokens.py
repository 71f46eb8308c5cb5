"""Trainable tokens (peft's TRAINABLE_TOKENS): only chosen embedding rows train; files cross with peft."""

import pytest
import torch

import deltatune as dt
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS

peft = pytest.importorskip("peft")
TINY = TINY_MODELS["llama"]
IDS = sorted(set(TINY.make_inputs(0)["input_ids"].flatten().tolist()))[:3]  # tokens the inputs use


def test_only_the_chosen_rows_train_and_merge_exactly():
    tuned = dt.get_tuned_model(TINY.fresh(), dt.TrainableTokensConfig(token_indices=IDS))
    base = contract.run(TINY, TINY.fresh())
    torch.testing.assert_close(contract.run(TINY, tuned), base)  # starts as the rows' copies
    assert [n for n, p in tuned.named_parameters() if p.requires_grad] == [
        "model.model.embed_tokens.deltas.default.trainable_tokens_delta"
    ]
    with torch.no_grad():
        tuned.model.model.embed_tokens.deltas["default"].trainable_tokens_delta.add_(1.0)
    changed = contract.run(TINY, tuned)
    assert (changed - base).abs().max() > 1e-3
    table = tuned.model.model.embed_tokens.base_layer.weight.detach().clone()
    tuned.merge_adapter()
    torch.testing.assert_close(contract.run(TINY, tuned), changed, atol=1e-5, rtol=0)
    tuned.unmerge_adapter()
    assert torch.equal(tuned.model.model.embed_tokens.base_layer.weight, table)


def test_ours_loads_in_peft_and_back(tmp_path):
    tuned = dt.get_tuned_model(TINY.fresh(), dt.TrainableTokensConfig(token_indices=IDS))
    contract.perturb(tuned)
    ours = contract.run(TINY, tuned)
    tuned.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        "base_model.model.model.embed_tokens.trainable_tokens_delta": (3, 16)
    }  # peft's layout; the table itself is not saved
    theirs = peft.PeftModel.from_pretrained(TINY.fresh(), tmp_path / "ours").eval()
    torch.testing.assert_close(contract.run(TINY, theirs), ours, atol=1e-5, rtol=0)

    torch.manual_seed(3)
    theirs = peft.get_peft_model(TINY.fresh(), peft.TrainableTokensConfig(token_indices=IDS[1:], init_weights=False))
    expected = contract.run(TINY, theirs.eval())
    assert (expected - contract.run(TINY, TINY.fresh())).abs().max() > 1e-3
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = dt.TunedModel.from_pretrained(TINY.fresh(), tmp_path / "theirs")
    torch.testing.assert_close(contract.run(TINY, loaded), expected, atol=1e-5, rtol=0)


def test_bad_indices_are_refused():
    with pytest.raises(dt.ConfigError, match="resize"):
        dt.get_tuned_model(TINY.fresh(), dt.TrainableTokensConfig(token_indices=[999]))
    with pytest.raises(dt.ConfigError, match="twice"):
        dt.TrainableTokensConfig(token_indices=[1, 1])


def _tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 3, 5, 9, 3]])).logits


def test_tied_embeddings_train_the_head_rows_too_and_cross_with_peft(tmp_path):
    tuned = dt.get_tuned_model(_tied(), dt.TrainableTokensConfig(token_indices=[3, 5]))
    torch.testing.assert_close(_logits(tuned), _logits(_tied()))
    with torch.no_grad():
        tuned.model.model.embed_tokens.deltas["default"].trainable_tokens_delta.add_(0.5)
    ours = _logits(tuned)
    theirs = peft.get_peft_model(_tied(), peft.TrainableTokensConfig(token_indices=[3, 5]))
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.trainable_tokens_delta["default"].add_(0.5)
    torch.testing.assert_close(ours, _logits(theirs.eval()), atol=1e-5, rtol=0)  # the head's logits too
    with pytest.warns(UserWarning, match="tied"):
        tuned.merge_adapter()
    torch.testing.assert_close(_logits(tuned), ours, atol=1e-5, rtol=0)
    tuned.unmerge_adapter()
    tuned.save_pretrained(tmp_path / "ours")  # both keys, as peft writes them
    loaded = peft.PeftModel.from_pretrained(_tied(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(loaded), ours, atol=1e-5, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    back = dt.TunedModel.from_pretrained(_tied(), tmp_path / "theirs")
    torch.testing.assert_close(_logits(back), ours, atol=1e-5, rtol=0)


def test_lora_token_rows_on_tied_embeddings_equal_peft(tmp_path):
    config = dict(target_modules=["q_proj"], trainable_token_indices=[3, 5], init_lora_weights=False)
    torch.manual_seed(2)
    theirs = peft.get_peft_model(_tied(), peft.LoraConfig(**config))
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].add_(0.5)
    expected = _logits(theirs.eval())
    theirs.save_pretrained(tmp_path / "theirs")
    ours = dt.TunedModel.from_pretrained(_tied(), tmp_path / "theirs")
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_tied(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(back), expected, atol=1e-5, rtol=0)
    plain = torch.tensor([[1, 9, 11]])  # no trained token in the input: only the tied head sees the rows
    with torch.no_grad():
        before = ours(input_ids=plain).logits
        ours.model.model.embed_tokens.deltas["default"].token_adapter.trainable_tokens_delta.add_(1.0)
        after = ours(input_ids=plain).logits
    assert (after[..., 3] - before[..., 3]).abs().max() > 1e-3  # the trained token's logit moved
    torch.testing.assert_close(after[..., 4], before[..., 4])  # another token's did not


@pytest.mark.parametrize("indices", [IDS, {"embed_tokens": IDS}])
def test_lora_trainable_token_indices_cross_with_peft(tmp_path, indices):
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=indices)
    tuned = dt.get_tuned_model(TINY.fresh(), config)
    torch.testing.assert_close(contract.run(TINY, tuned), contract.run(TINY, TINY.fresh()))
    trainable = [n for n, p in tuned.named_parameters() if p.requires_grad]
    assert "model.model.embed_tokens.deltas.default.token_adapter.trainable_tokens_delta" in trainable
    contract.perturb(tuned)
    ours = contract.run(TINY, tuned)
    tuned.merge_adapter()
    torch.testing.assert_close(contract.run(TINY, tuned), ours, atol=1e-5, rtol=0)
    tuned.unmerge_adapter()
    tuned.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(TINY.fresh(), tmp_path / "ours").eval()
    torch.testing.assert_close(contract.run(TINY, theirs), ours, atol=1e-5, rtol=0)

    torch.manual_seed(4)
    peft_config = peft.LoraConfig(
        r=4, target_modules=["q_proj"], trainable_token_indices=indices, init_lora_weights=False
    )
    theirs = peft.get_peft_model(TINY.fresh(), peft_config)
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].add_(0.5)
    expected = contract.run(TINY, theirs.eval())
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = dt.TunedModel.from_pretrained(TINY.fresh(), tmp_path / "theirs")
    torch.testing.assert_close(contract.run(TINY, loaded), expected, atol=1e-5, rtol=0)
    loaded.delete_adapter("default")  # the rows go with the adapter
    assert "deltas" not in str(dict(loaded.model.named_modules()).keys())


def test_lora_token_rows_refusals():
    with pytest.raises(dt.ConfigError, match="twice"):
        dt.LoraConfig(trainable_token_indices=[2, 2])
    config = dt.LoraConfig(r=4, target_modules=["embed_tokens"], trainable_token_indices=IDS)
    with pytest.raises(dt.ConfigError, match="both a LoRA target"):
        dt.get_tuned_model(TINY.fresh(), config)

"""Bad input to the virtual-token tuners (prompt tuning, P-tuning, prefix tuning) fails early and clearly."""

import pytest
import torch

import deltatune as dt
from deltatune.testing.tiny_models import build_tiny

CONFIGS = [dt.PromptTuningConfig, dt.PTuningConfig, dt.PrefixTuningConfig]


class WordTokenizer:
    """A tokenizer object as TEXT init needs one: text -> {"input_ids": [...]} (no download)."""

    name_or_path = "word-tokenizer"

    def __call__(self, text):
        return {"input_ids": [5 + len(word) for word in text.split()]}


@pytest.mark.parametrize("cls", CONFIGS)
@pytest.mark.parametrize("bad", [0, -2, None, True, 1.5])
def test_num_virtual_tokens_must_be_positive(cls, bad):
    with pytest.raises(dt.ConfigError, match="num_virtual_tokens"):
        cls(num_virtual_tokens=bad)


@pytest.mark.parametrize("cls", CONFIGS)
def test_more_virtual_tokens_than_positions(cls):
    with pytest.raises(dt.ConfigError, match=r"num_virtual_tokens=64 .*max_position_embeddings=64"):
        dt.get_tuned_model(build_tiny("llama"), cls(num_virtual_tokens=64))


def test_text_init_needs_text_and_tokenizer():
    with pytest.raises(dt.ConfigError, match="prompt_tuning_init_text"):
        dt.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", tokenizer_name_or_path=WordTokenizer())
    with pytest.raises(dt.ConfigError, match="tokenizer_name_or_path"):
        dt.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="classify this")
    with pytest.raises(dt.ConfigError, match="prompt_tuning_init='WORDS' is unknown"):
        dt.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="WORDS")
    with pytest.raises(dt.ConfigError, match="tokenizer_kwargs only apply"):
        dt.PromptTuningConfig(num_virtual_tokens=4, tokenizer_kwargs={"use_fast": True})


def test_text_init_with_a_tokenizer_object_and_never_downloads(tmp_path):
    model = build_tiny("llama")
    config = dt.PromptTuningConfig(
        num_virtual_tokens=5, prompt_tuning_init="TEXT", prompt_tuning_init_text="is it good",
        tokenizer_name_or_path=WordTokenizer(),
    )  # fmt: skip
    tuned = dt.get_tuned_model(model, config)
    ids = torch.tensor([7, 7, 9, 7, 7])  # "is it good" -> [7, 7, 9], repeated and cut to 5
    expected = model.get_input_embeddings().weight[ids]
    torch.testing.assert_close(tuned.adapter_state_dict()["prompt_embeddings"], expected)
    tuned.save_pretrained(tmp_path)  # the tokenizer object is saved as its name
    assert '"tokenizer_name_or_path": "word-tokenizer"' in (tmp_path / "adapter_config.json").read_text()
    dt.TunedModel.from_pretrained(build_tiny("llama"), tmp_path)  # loading needs no tokenizer

    missing = dt.PromptTuningConfig(
        num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="x",
        tokenizer_name_or_path=str(tmp_path / "no-such-tokenizer"),
    )  # fmt: skip
    with pytest.raises(dt.ConfigError, match="never downloads"):
        dt.get_tuned_model(build_tiny("llama"), missing)


def test_sample_vocab_init_uses_vocabulary_embeddings():
    model = build_tiny("gpt2")
    table = dt.get_tuned_model(model, dt.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"))
    rows = table.adapter_state_dict()["prompt_embeddings"]
    vocab = model.get_input_embeddings().weight
    assert all(any(torch.equal(row, word) for word in vocab) for row in rows)


def test_pairs_that_make_no_sense():
    with pytest.raises(dt.ConfigError, match="KV cache.*BertForSequenceClassification"):
        dt.get_tuned_model(build_tiny("bert"), dt.PrefixTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS"))
    with pytest.raises(dt.ConfigError, match="needs a transformers model.*ToyMLP"):
        dt.get_tuned_model(build_tiny("mlp"), dt.PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(dt.ConfigError, match="token input embeddings.*ViTForImageClassification"):
        dt.get_tuned_model(build_tiny("vit"), dt.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(dt.ConfigError, match="target_modules.*targets no module"):
        dt.PromptTuningConfig(num_virtual_tokens=2, target_modules=["q_proj"])
    with pytest.raises(dt.ConfigError, match="encoder_reparameterization_type='GRU'"):
        dt.PTuningConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU")
    with pytest.raises(dt.ConfigError, match="init_weights"):
        dt.PrefixTuningConfig(num_virtual_tokens=2, init_weights="ones")


def test_merge_refused_and_one_input_adapter_active():
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.PromptTuningConfig(num_virtual_tokens=2))
    for merge in (tuned.merge_adapter, tuned.merge_and_unload):
        with pytest.raises(dt.MergeError, match="rewrites the model's inputs"):
            merge()
    tuned.add_adapter("prefix", dt.PrefixTuningConfig(num_virtual_tokens=2))
    tuned.set_adapter(["default", "prefix"])
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(dt.ConfigError, match="at most one"):
        tuned(input_ids=ids)
    tuned.set_adapter("prefix")
    assert tuned(input_ids=ids).logits.shape == (1, 3, 64)
    plain = tuned.unload()
    assert type(plain).__name__ == "LlamaForCausalLM" and not tuned.input_modules


def test_wrong_prompt_shape_in_file_is_refused(tmp_path):
    dt.get_tuned_model(build_tiny("llama"), dt.PromptTuningConfig(num_virtual_tokens=2)).save_pretrained(tmp_path)
    config = (
        (tmp_path / "adapter_config.json").read_text().replace('"num_virtual_tokens": 2', '"num_virtual_tokens": 3')
    )
    (tmp_path / "adapter_config.json").write_text(config)
    with pytest.raises(dt.AdapterLoadError, match="prompt_embeddings.*shape"):
        dt.TunedModel.from_pretrained(build_tiny("llama"), tmp_path)


def test_loaded_p_tuning_trains_its_table(tmp_path):
    """The file holds the encoder's output; a trainable load trains that table directly."""
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.PTuningConfig(num_virtual_tokens=2, encoder_hidden_size=8))
    tuned.save_pretrained(tmp_path)
    loaded = dt.TunedModel.from_pretrained(build_tiny("llama"), tmp_path, is_trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable == ["input_modules.default.embedding.weight"]


def test_composes_with_a_delta_adapter_on_the_embedding():
    """LoRA (even on the input embedding) and prompt tuning active together: both act, each can be dropped."""
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["embed_tokens", "q_proj"], r=2))
    tuned.add_adapter("prompt", dt.PromptTuningConfig(num_virtual_tokens=2))
    with torch.no_grad():
        for param in tuned.parameters():
            if param.requires_grad:
                param.add_(0.5)
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lora_only = tuned(input_ids=ids).logits
        tuned.set_adapter(["default", "prompt"])
        both = tuned(input_ids=ids).logits[:, 2:]
        tuned.set_adapter("prompt")
        prompt_only = tuned(input_ids=ids).logits[:, 2:]
    assert (both - lora_only).abs().max() > 1e-4 and (both - prompt_only).abs().max() > 1e-4

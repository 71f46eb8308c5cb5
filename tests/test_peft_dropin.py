"""Drop-in for peft: the behaviours and API a peft user's code relies on (issue 26), with the real
peft as the oracle where it has the behaviour. Tiny models built from config, CPU, offline."""

import logging
import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.testing.tiny_models import TINY_MODELS

peft = pytest.importorskip("peft")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.lin(x)))


def _toy(seed=0):
    torch.manual_seed(seed)
    return Toy().eval()


def _x():
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


def _llama(tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


IDS = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(2))


# -- item 1: biases -------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_second_adapter_training_biases_is_refused_as_in_peft(bias):
    tuned = dt.get_tuned_model(_toy(), dt.LoraConfig(target_modules=["lin"], bias=bias))
    with pytest.raises(ValueError, match="only one adapter may train base biases"):
        tuned.add_adapter("b", dt.LoraConfig(target_modules=["lin"], bias=bias))
    tuned.add_adapter("c", dt.LoraConfig(target_modules=["lin"]))  # bias="none" next to it: fine (as peft)
    theirs = peft.get_peft_model(_toy(), peft.LoraConfig(target_modules=["lin"], bias=bias))
    with pytest.raises(ValueError):
        theirs.add_adapter("b", peft.LoraConfig(target_modules=["lin"], bias=bias))


# -- item 2: tied embedding -------------------------------------------------------------------------
def test_merging_lora_on_a_tied_embedding_leaves_the_head_alone(tmp_path):
    base = _llama(tie=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    tuned = dt.get_tuned_model(base, dt.LoraConfig(target_modules=["embed_tokens"], init_lora_weights=False))
    unmerged = tuned(input_ids=IDS).logits
    with pytest.warns(UserWarning, match="tied"):
        tuned.merge_adapter()
    torch.testing.assert_close(tuned(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)
    tuned.unmerge_adapter()
    torch.testing.assert_close(tuned(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = tuned.merge_and_unload()
    assert merged.config.tie_word_embeddings is False
    torch.testing.assert_close(merged(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged.lm_head.weight, _llama(tie=True).lm_head.weight)
    merged.save_pretrained(tmp_path)  # the saved config keeps them apart, so reloading does not re-tie
    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)


# -- item 3: scaled embeddings ---------------------------------------------------------------------------
def _gemma3(seed=0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, sliding_window=8,
    )  # fmt: skip
    return Gemma3ForCausalLM(cfg).eval()


def test_lora_on_gemma3_scaled_embedding_matches_merged_and_peft(tmp_path):
    base = _gemma3()
    assert float(base.model.embed_tokens.embed_scale) != 1.0
    config = dict(target_modules=["embed_tokens"], r=4, lora_alpha=8, init_lora_weights=False)
    tuned = dt.get_tuned_model(base, dt.LoraConfig(**config))
    unmerged = tuned(input_ids=IDS).logits
    tuned.save_pretrained(tmp_path, save_embedding_layers=False)
    theirs = peft.PeftModel.from_pretrained(_gemma3(), tmp_path).eval()
    torch.testing.assert_close(theirs(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)
    tuned.merge_adapter()
    torch.testing.assert_close(tuned(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)


def test_lora_on_any_embedding_with_an_embed_scale():
    class Scaled(nn.Embedding):
        def __init__(self):
            super().__init__(20, 6)
            self.register_buffer("embed_scale", torch.tensor(3.0), persistent=False)

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = Scaled()

        def forward(self, ids):
            return self.emb(ids)

    torch.manual_seed(0)
    tuned = dt.get_tuned_model(M(), dt.LoraConfig(target_modules=["emb"], init_lora_weights=False))
    ids = torch.randint(0, 20, (2, 5))
    unmerged = tuned(ids)
    tuned.merge_adapter()
    torch.testing.assert_close(tuned(ids), unmerged)


# -- item 4: two active copies of one module ---------------------------------------------------------------
def test_two_active_adapters_with_the_same_module_to_save_are_refused():
    tuned = dt.get_tuned_model(_toy(), dt.LoraConfig(target_modules=["lin"], modules_to_save=["head"]))
    tuned.add_adapter("b", dt.LoraConfig(target_modules=["lin"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        tuned.set_adapter(["default", "b"])
    assert tuned.active_adapters == ["default"]  # unchanged
    theirs = peft.get_peft_model(_toy(), peft.LoraConfig(target_modules=["lin"], modules_to_save=["head"]))
    theirs.add_adapter("b", peft.LoraConfig(target_modules=["lin"], modules_to_save=["head"]))
    with pytest.raises(ValueError):
        theirs.base_model.set_adapter(["default", "b"])


# -- item 5: keyword arguments are honoured or refused ----------------------------------------------------------
def test_unknown_or_unsupported_keywords_are_refused(tmp_path):
    tuned = dt.get_tuned_model(_toy(), dt.LoraConfig(target_modules=["lin"]))
    with pytest.raises(dt.ConfigError, match="safe_serialization"):
        tuned.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(TypeError, match="push_to_hubb"):
        tuned.save_pretrained(tmp_path, push_to_hubb=True)
    tuned.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(TypeError, match="token"):
        dt.TunedModel.from_pretrained(_toy(), tmp_path, token="x")
    with pytest.raises(TypeError, match="revision"):
        tuned.load_adapter(tmp_path, "b", revision="main")
    with pytest.raises(dt.ConfigError, match="mixed"):
        dt.get_tuned_model(_toy(), dt.LoraConfig(target_modules=["lin"]), mixed=True)
    assert "b" not in tuned.adapters


def test_is_main_process_false_writes_nothing_and_subfolder_is_read(tmp_path):
    tuned = dt.get_tuned_model(_toy(), dt.LoraConfig(target_modules=["lin"], init_lora_weights=False))
    tuned.save_pretrained(tmp_path / "x", is_main_process=False)
    assert not (tmp_path / "x").exists()
    tuned.save_pretrained(tmp_path / "repo" / "sub")
    loaded = dt.TunedModel.from_pretrained(_toy(), tmp_path / "repo", subfolder="sub")
    torch.testing.assert_close(loaded(_x()), tuned(_x()))


def test_from_pretrained_config_keyword_is_used_instead_of_the_file(tmp_path):
    tuned = dt.get_tuned_model(
        _toy(), dt.LoraConfig(target_modules=["lin"], r=4, lora_alpha=4, init_lora_weights=False)
    )
    tuned.save_pretrained(tmp_path)
    config = dt.LoraConfig(target_modules=["lin"], r=4, lora_alpha=8)  # twice the scale
    ours = dt.TunedModel.from_pretrained(_toy(), tmp_path, config=config)
    assert ours.peft_config["default"].lora_alpha == 8 and ours.peft_config["default"].inference_mode
    theirs = peft.PeftModel.from_pretrained(
        _toy(), tmp_path, config=peft.LoraConfig(target_modules=["lin"], r=4, lora_alpha=8)
    )
    torch.testing.assert_close(ours(_x()), theirs(_x()))
    assert not torch.allclose(ours(_x()), tuned(_x()))


def test_key_mapping_renames_file_keys(tmp_path):
    tuned = dt.get_tuned_model(_toy(), dt.LoraConfig(target_modules=["lin"], init_lora_weights=False))
    tuned.save_pretrained(tmp_path)

    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.relu(self.inner(x)))

    renamed = Renamed()
    renamed.load_state_dict({k.replace("lin.", "inner."): v for k, v in _toy().state_dict().items()})
    config = dt.LoraConfig(target_modules=["inner"])
    loaded = dt.TunedModel.from_pretrained(renamed.eval(), tmp_path, config=config, key_mapping={r"^lin\.": "inner."})
    torch.testing.assert_close(loaded(_x()), tuned(_x()))


# -- item 6: disabled adapters do not train --------------------------------------------------------------------
def test_adapter_parameters_are_frozen_inside_disable_adapter():
    tuned = dt.get_tuned_model(_toy(), dt.LoraConfig(target_modules=["lin"]))
    trainable = lambda: sorted(n for n, p in tuned.named_parameters() if p.requires_grad)  # noqa: E731
    before = trainable()
    assert before
    with tuned.disable_adapter():
        assert trainable() == []
    assert trainable() == before
    tuned.disable_adapter_layers()
    assert trainable() == []
    torch.testing.assert_close(tuned(_x()), _toy()(_x()))
    tuned.enable_adapter_layers()
    assert trainable() == before


# -- item 7: target_modules=None on known architectures -------------------------------------------------------------
@pytest.mark.parametrize(
    ("model_name", "tuner"),
    [("llama", "lora"), ("gpt2", "lora"), ("bert", "lora"), ("t5", "lora"),
     ("llama", "ia3"), ("gpt2", "ia3"), ("bert", "ia3"), ("t5", "ia3"), ("llama", "ln_tuning"), ("gpt2", "ln_tuning"),
     ("llama", "loha"), ("gpt2", "fourierft")],
)  # fmt: skip
def test_unset_target_modules_take_peft_defaults(model_name, tuner, caplog):
    tiny = TINY_MODELS[model_name]
    names = {"lora": "LoraConfig", "ia3": "IA3Config", "ln_tuning": "LNTuningConfig", "loha": "LoHaConfig",
             "fourierft": "FourierFTConfig"}  # fmt: skip
    if not hasattr(dt, names[tuner]):
        pytest.skip(f"deltatune has no {names[tuner]}")
    ours_cls, theirs_cls = getattr(dt, names[tuner]), getattr(peft, names[tuner])
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        ours = dt.get_tuned_model(tiny.fresh(), ours_cls(task_type=tiny.task_type))
    assert "target_modules is unset" in caplog.text
    theirs = peft.get_peft_model(tiny.fresh(), theirs_cls(task_type=tiny.task_type))
    ours_targets = sorted(ours.adapters["default"].config.target_modules)
    assert ours_targets == sorted(theirs.peft_config["default"].target_modules)
    ours_trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    theirs_trainable = sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    assert len(ours_trainable) == len(theirs_trainable) > 0
    if tuner == "ia3":
        assert sorted(ours.adapters["default"].config.feedforward_modules) == sorted(
            theirs.peft_config["default"].feedforward_modules
        )


def test_unset_target_modules_on_an_unknown_model_still_asks_for_them():
    with pytest.raises(ValueError, match="target_modules"):
        dt.get_tuned_model(_toy(), dt.LoraConfig())


# -- item 8: autocast_adapter_dtype ---------------------------------------------------------------------
def test_autocast_adapter_dtype_false_keeps_the_base_dtype(tmp_path):
    base = _llama().to(torch.bfloat16)
    kept = dt.get_tuned_model(base, dt.LoraConfig(target_modules=["q_proj", "v_proj"]), autocast_adapter_dtype=False)
    dtypes = {p.dtype for n, p in kept.named_parameters() if p.requires_grad}
    assert dtypes == {torch.bfloat16}
    theirs = peft.get_peft_model(
        _llama().to(torch.bfloat16), peft.LoraConfig(target_modules=["q_proj", "v_proj"]), autocast_adapter_dtype=False
    )
    assert {p.dtype for p in theirs.parameters() if p.requires_grad} == dtypes
    kept(input_ids=IDS).logits.float().sum().backward()
    default = dt.get_tuned_model(_llama().to(torch.bfloat16), dt.LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert {p.dtype for p in default.parameters() if p.requires_grad} == {torch.float32}
    default.save_pretrained(tmp_path)
    loaded = dt.TunedModel.from_pretrained(_llama().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=False)
    assert {p.dtype for n, p in loaded.named_parameters() if "lora_" in n} == {torch.bfloat16}


# -- item 10: peft's low-level API ---------------------------------------------------------------------------
def test_inject_and_state_dict_functions_match_peft():
    config = dict(target_modules=["lin"], r=2, init_lora_weights=False)
    torch.manual_seed(5)
    ours = dt.inject_adapter_in_model(dt.LoraConfig(**config), _toy())
    assert isinstance(ours, Toy)
    torch.manual_seed(5)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), _toy())
    ours_sd = dt.get_peft_model_state_dict(ours)
    theirs_sd = peft.get_peft_model_state_dict(theirs)
    assert sorted(ours_sd) == sorted(theirs_sd)
    theirs_sd = {k: torch.randn_like(v) for k, v in theirs_sd.items()}
    peft.set_peft_model_state_dict(theirs, theirs_sd)
    result = dt.set_peft_model_state_dict(ours, theirs_sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(ours(_x()), theirs(_x()))
    with pytest.raises(dt.AdapterLoadError):
        dt.set_peft_model_state_dict(ours, {k: v[:1] for k, v in theirs_sd.items()})


def test_base_model_state_dict_has_the_original_keys():
    tuned = dt.get_tuned_model(_toy(), dt.LoraConfig(target_modules=["lin"], modules_to_save=["head"]))
    theirs = peft.get_peft_model(_toy(), peft.LoraConfig(target_modules=["lin"], modules_to_save=["head"]))
    ours_sd = dt.get_base_model_state_dict(tuned)
    assert sorted(ours_sd) == sorted(_toy().state_dict()) == sorted(peft.get_base_model_state_dict(theirs))
    new = _toy(seed=9).state_dict()
    dt.set_base_model_state_dict(tuned, new)
    torch.testing.assert_close(tuned.model.lin.base_layer.weight, new["lin.weight"])
    with pytest.raises(RuntimeError, match="unexpected"):
        dt.set_base_model_state_dict(tuned, {**new, "nope.weight": torch.zeros(1)})


def test_save_embedding_layers_writes_the_embedding_with_the_adapter(tmp_path):
    from safetensors.torch import load_file

    tuned = dt.get_tuned_model(_llama(), dt.LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        tuned.save_pretrained(tmp_path / "auto")
    keys = set(load_file(tmp_path / "auto" / "adapter_model.safetensors"))
    assert (
        "base_model.model.model.embed_tokens.base_layer.weight" in keys
        and "base_model.model.lm_head.weight" not in keys
    )
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "peft")
    assert set(load_file(tmp_path / "peft" / "adapter_model.safetensors")) == keys
    dt.TunedModel.from_pretrained(_llama(), tmp_path / "peft")  # the base tensors equal ours: accepted
    tuned.save_pretrained(tmp_path / "off", save_embedding_layers=False)
    assert not any("base_layer" in k for k in load_file(tmp_path / "off" / "adapter_model.safetensors"))


def test_is_prompt_learning_flag():
    assert dt.PromptTuningConfig(num_virtual_tokens=2).is_prompt_learning
    assert dt.PrefixTuningConfig(num_virtual_tokens=2).is_prompt_learning
    assert not dt.LoraConfig().is_prompt_learning and not dt.IA3Config().is_prompt_learning


# -- item 11: contracts ---------------------------------------------------------------------------------------
def test_deleting_a_merged_adapter_is_a_value_error_and_double_merge_warns():
    tuned = dt.get_tuned_model(_toy(), dt.LoraConfig(target_modules=["lin"], init_lora_weights=False))
    tuned.merge_adapter()
    with pytest.warns(UserWarning, match="already merged"):
        tuned.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        tuned.delete_adapter("default")
    theirs = peft.get_peft_model(_toy(), peft.LoraConfig(target_modules=["lin"], init_lora_weights=False))
    theirs.merge_adapter()
    with pytest.raises(ValueError):
        theirs.delete_adapter("default")
    tuned.unmerge_adapter()
    tuned.delete_adapter("default")


@pytest.mark.parametrize(
    "call",
    [
        lambda t: t.set_adapter("nope"),
        lambda t: t.delete_adapter("nope"),
        lambda t: t.add_adapter("default", dt.LoraConfig(target_modules=["lin"])),
        lambda t: t.add_adapter("../x", dt.LoraConfig(target_modules=["lin"])),
    ],
    ids=["set-unknown", "delete-unknown", "duplicate", "bad-name"],
)
def test_bad_names_raise_value_error(call):
    tuned = dt.get_tuned_model(_toy(), dt.LoraConfig(target_modules=["lin"]))
    with pytest.raises(ValueError):
        call(tuned)


# -- item 9: grouped convolutions and nn.MultiheadAttention -------------------------------------------
class Tower(nn.Module):
    """A CLIP/OpenCLIP-style block: a grouped conv stem and nn.MultiheadAttention."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(4, 8, 3, groups=2, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, img):
        tokens = self.stem(img).flatten(2).transpose(1, 2)  # (B, HW, 8)
        return self.attn(tokens, tokens, tokens, need_weights=False)[0]


def _tower(seed=0):
    torch.manual_seed(seed)
    return Tower().eval()


IMG = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(4))


def test_lora_on_grouped_conv_matches_peft_both_ways(tmp_path):
    config = dict(target_modules=["stem"], r=4, lora_alpha=8, init_lora_weights=False)
    ours = dt.get_tuned_model(_tower(), dt.LoraConfig(**config))
    assert not torch.allclose(ours(IMG), _tower()(IMG))
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_tower(), tmp_path / "ours").eval()
        torch.testing.assert_close(theirs(IMG), ours(IMG))
        torch.manual_seed(7)
        peft_made = peft.get_peft_model(_tower(), peft.LoraConfig(**config)).eval()
        peft_made.save_pretrained(tmp_path / "peft")
    loaded = dt.TunedModel.from_pretrained(_tower(), tmp_path / "peft")
    torch.testing.assert_close(loaded(IMG), peft_made(IMG))
    with pytest.raises(dt.MergeError, match="grouped"):
        loaded.merge_adapter()
    torch.testing.assert_close(loaded(IMG), peft_made(IMG))  # refused: nothing changed
    with pytest.raises(ValueError, match="divisible"):
        dt.get_tuned_model(_tower(), dt.LoraConfig(target_modules=["stem"], r=3))


def test_lora_on_multihead_attention_keys_merge_and_maths(tmp_path):
    from safetensors.torch import load_file

    config = dict(target_modules=["attn"], r=2, lora_alpha=4, init_lora_weights=False)
    ours = dt.get_tuned_model(_tower(), dt.LoraConfig(**config))
    out = ours(IMG)
    assert not torch.allclose(out, _tower()(IMG))
    # the maths: MHA run with W_in + s B A and W_out + s B' A'
    delta = ours.model.attn.deltas["default"]
    base = _tower()
    with torch.no_grad():
        base.attn.in_proj_weight += delta.lora_B.weight @ delta.lora_A.weight * 2.0
        o = delta.base_layer.out_proj
        base.attn.out_proj.weight += o.lora_B.weight @ o.lora_A.weight * 2.0
    torch.testing.assert_close(out, base(IMG))
    out.sum().backward()  # trains through the replaced weights
    assert delta.lora_A.weight.grad is not None and o.lora_B.weight.grad is not None
    ours.merge_adapter()
    torch.testing.assert_close(ours(IMG), out)
    ours.unmerge_adapter()
    torch.testing.assert_close(ours.model.attn.base_layer.in_proj_weight, _tower().attn.in_proj_weight)
    # peft's file layout, key for key
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.get_peft_model(_tower(), peft.LoraConfig(**config))
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        peft.get_peft_model_state_dict(theirs)
    )
    merged = ours.merge_and_unload()
    assert type(merged.attn) is nn.MultiheadAttention
    torch.testing.assert_close(merged(IMG), out)


def test_lora_on_multihead_attention_in_proj_matches_peft(tmp_path):
    """peft <= 0.21 applies the out_proj update twice (peft PR #3774): compare with the out_proj update at
    zero, where both libraries compute the same thing; the file loads in peft without key warnings."""
    config = dict(target_modules=["attn"], r=2, lora_alpha=4, init_lora_weights=False)
    ours = dt.get_tuned_model(_tower(), dt.LoraConfig(**config))
    with torch.no_grad():
        ours.model.attn.deltas["default"].base_layer.out_proj.lora_B.weight.zero_()
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(_tower(), tmp_path).eval()
    assert not any("missing" in str(w.message).lower() or "unexpected" in str(w.message).lower() for w in record)
    torch.testing.assert_close(theirs(IMG), ours(IMG))


# -- item 12: prefix tuning on encoders without a KV cache -----------------------------------------------
def _deberta():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    cfg = DebertaV2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, num_labels=2,
    )  # fmt: skip
    return DebertaV2ForSequenceClassification(cfg).eval()


def test_prefix_tuning_on_an_encoder_without_a_kv_cache_is_refused_up_front():
    with pytest.raises(dt.ConfigError, match="KV cache"):
        dt.get_tuned_model(_deberta(), dt.PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
    # peft builds it, then fails on the first forward: the refusal only comes earlier here
    theirs = peft.get_peft_model(_deberta(), peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
    with pytest.raises((ValueError, TypeError)):
        theirs(input_ids=IDS)
    dt.get_tuned_model(_deberta(), dt.PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))(input_ids=IDS)


# -- item 10: convert_to_lora ---------------------------------------------------------------------------
def test_convert_to_lora_is_exact_at_full_rank_and_loads_in_peft(tmp_path):
    ia3 = dt.get_tuned_model(_llama(), dt.IA3Config(init_ia3_weights=False))  # peft's llama defaults
    want = ia3(input_ids=IDS).logits
    config, state = dt.convert_to_lora(ia3, rank=1.0)  # all the energy: each layer's full rank, exact
    assert {
        "model.layers.0.mlp.down_proj": 16,
        "model.layers.0.self_attn.k_proj": 8,
    }.items() <= config.rank_pattern.items()
    lora = dt.get_tuned_model(_llama(), config)
    dt.set_peft_model_state_dict(lora, state)
    torch.testing.assert_close(lora(input_ids=IDS).logits, want, atol=1e-4, rtol=0)
    theirs = peft.get_peft_model(
        _llama(), peft.LoraConfig(**{k: v for k, v in config.to_peft_dict()[0].items() if k != "peft_type"})
    )
    peft.set_peft_model_state_dict(theirs, state)
    torch.testing.assert_close(theirs(input_ids=IDS).logits, want, atol=1e-4, rtol=0)
    small, small_state = dt.convert_to_lora(ia3, rank=4)
    assert small.r == small.lora_alpha == 4 and not small.rank_pattern
    assert small_state["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 32)
    with pytest.raises(ValueError, match="larger than the weight"):
        dt.convert_to_lora(ia3, rank=9)
    with pytest.raises(ValueError, match="threshold"):
        dt.convert_to_lora(ia3, rank=1.5)


def test_save_pretrained_state_dict_gives_the_values_to_save(tmp_path):
    tuned = dt.get_tuned_model(_toy(), dt.LoraConfig(target_modules=["lin"], init_lora_weights=False))
    snapshot = {k: v.clone() for k, v in tuned.state_dict().items()}
    want = tuned(_x())
    with torch.no_grad():
        tuned.model.lin.deltas["default"].lora_B.weight.zero_()  # live values change after the snapshot
    tuned.save_pretrained(tmp_path, state_dict=snapshot)
    torch.testing.assert_close(dt.TunedModel.from_pretrained(_toy(), tmp_path)(_x()), want)


def test_disabling_an_adapter_that_trained_biases_warns_as_peft_does():
    tuned = dt.get_tuned_model(_toy(), dt.LoraConfig(target_modules=["lin"], bias="all"))
    with pytest.warns(UserWarning, match="bias"):
        with tuned.disable_adapter():
            pass
    merged_refusal = dt.get_tuned_model(
        _tower(), dt.LoraConfig(target_modules=["stem", "attn"], r=2, init_lora_weights=False)
    )
    with pytest.raises(dt.MergeError, match="grouped"):
        merged_refusal.merge_adapter(safe_merge=False)  # refused before any layer (attn too) is written
    assert merged_refusal.model.attn.merged == []


def test_set_adapter_inference_mode_and_set_requires_grad(tmp_path):
    tuned = dt.get_tuned_model(_toy(), dt.LoraConfig(target_modules=["lin"]))
    tuned.save_pretrained(tmp_path)
    loaded = dt.TunedModel.from_pretrained(_toy(), tmp_path)  # inference mode: frozen
    grads = lambda m: {p.requires_grad for n, p in m.named_parameters() if "lora_" in n}  # noqa: E731
    assert grads(loaded) == {False}
    loaded.set_adapter("default", inference_mode=False)
    assert grads(loaded) == {True}
    loaded.set_adapter("default", inference_mode=True)
    assert grads(loaded) == {False}
    loaded.set_requires_grad("default")
    assert grads(loaded) == {True}
    theirs = peft.PeftModel.from_pretrained(_toy(), tmp_path)
    theirs.set_adapter("default", inference_mode=True)
    assert grads(theirs) == {False}
    theirs.set_requires_grad("default")
    assert grads(theirs) == {True}


def test_default_target_tables_equal_peft_constants():
    from peft.utils import constants as c

    from deltatune.models.peft_targets import TABLES

    for ours, theirs in [("LORA", "LORA"), ("IA3", "IA3"), ("LN_TUNING", "LNTUNING"), ("FOURIERFT", "FOURIERFT"),
                         ("VERA", "VERA"), ("LOHA", "LOHA"), ("LOKR", "LOKR"), ("OFT", "OFT"), ("BOFT", "BOFT"),
                         ("HRA", "HRA"), ("MISS", "MISS"), ("ADALORA", "ADALORA"), ("VBLORA", "VBLORA")]:  # fmt: skip
        table = getattr(c, f"TRANSFORMERS_MODELS_TO_{theirs}_TARGET_MODULES_MAPPING")
        assert {k: v["target_modules"] for k, v in TABLES[ours].items()} == table, ours
    feedforward = c.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
    assert {k: v["feedforward_modules"] for k, v in TABLES["IA3"].items()} == {
        k: feedforward.get(k, []) for k in TABLES["IA3"]
    }


def test_a_non_finite_merge_is_a_value_error_as_in_peft():
    tuned = dt.get_tuned_model(_toy(), dt.LoraConfig(target_modules=["lin"], init_lora_weights=False))
    theirs = peft.get_peft_model(_toy(), peft.LoraConfig(target_modules=["lin"], init_lora_weights=False))
    for model in (tuned, theirs):
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("inf"))
    with pytest.raises(ValueError):
        theirs.merge_adapter(safe_merge=True)
    with pytest.raises(ValueError):
        tuned.merge_adapter()
    assert isinstance(dt.MergeError("x"), RuntimeError)  # and still what deltatune raised before

"""`tuned(input_ids, labels=...)` in training mode: the fused loss equals the standard forward's.

The standard path is the same TunedModel with `fused_loss = False` (transformers' own forward:
full logits, `ForCausalLMLoss`). Every comparison first checks that the fused path was taken
(`.logits is None`) and that the reference built logits, so neither side can pass vacuously.
"""

import pytest
import torch

import deltatune as dt
from deltatune.ops import fused_forward
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS

CONFIGS = {
    "lora": lambda: dt.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4, task_type="CAUSAL_LM"),
    "dora": lambda: dt.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, use_dora=True, task_type="CAUSAL_LM"),
    "ia3": lambda: dt.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
    ),  # fmt: skip
    "prompt": lambda: dt.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "ptuning": lambda: dt.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16, task_type="CAUSAL_LM"),
    "prefix": lambda: dt.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
}


def _batch(padded: bool) -> dict[str, torch.Tensor]:
    inputs = TINY_MODELS["llama"].make_inputs(0)  # (2, T) token ids, mask of ones
    labels = inputs["input_ids"].clone()
    if padded:  # right padding on row 0 (masked out, labels -100) and a masked prompt on row 1
        inputs["attention_mask"][0, -3:] = 0
        labels[0, -3:] = -100
        labels[1, :2] = -100
    return {**inputs, "labels": labels}


def _tuned(kind: str, **flags) -> dt.TunedModel:
    tuned = dt.get_tuned_model(TINY_MODELS["llama"].fresh(), CONFIGS[kind](), **flags)
    contract.perturb(tuned)  # the adapter changes the output: gradients are not trivially equal
    return tuned.train()


def _loss_and_grads(tuned: dt.TunedModel, call) -> tuple[torch.Tensor, object, list[torch.Tensor]]:
    params = [p for p in tuned.parameters() if p.requires_grad]
    out = call(tuned)
    return out.loss, out, list(torch.autograd.grad(out.loss, params))


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_loss_and_grads_equal_the_standard_forward(kind, padded):
    batch = _batch(padded)
    tuned = _tuned(kind)
    loss, out, grads = _loss_and_grads(tuned, lambda m: m(batch["input_ids"], attention_mask=batch["attention_mask"],
                                                          labels=batch["labels"]))  # fmt: skip
    assert out.logits is None, "the fused path was not taken"
    tuned.fused_loss = False
    ref_loss, ref, ref_grads = _loss_and_grads(tuned, lambda m: m(**batch))
    assert ref.logits is not None and ref.logits.shape[-1] == 64
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert len(grads) == len(ref_grads) > 0
    for ours, theirs in zip(grads, ref_grads):
        assert theirs.abs().max() > 0
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-4)


def test_num_items_in_batch_and_shift_labels_as_transformers_uses_them():
    batch = _batch(padded=True)
    tuned = _tuned("lora")
    count = torch.tensor(40)  # Trainer passes the supervised-token count of the whole accumulated step
    shift = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    shift[1, 5] = -100
    for extra in (
        {"num_items_in_batch": count},
        {"shift_labels": shift},
        {"shift_labels": shift, "num_items_in_batch": 7},
    ):
        tuned.fused_loss = True
        out = tuned(**batch, **extra)
        tuned.fused_loss = False
        ref = tuned(**batch, **extra)
        assert out.logits is None and ref.logits is not None
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)


def test_logits_contract():
    """Fused: .logits is None (never partial or stale); eval, no labels, or fused_loss=False: real logits."""
    batch = _batch(padded=False)
    tuned = _tuned("lora")
    assert tuned.fused_loss is True
    assert tuned(**batch).logits is None
    assert "logits" not in tuned(**batch)  # a ModelOutput leaves None fields out of its keys and tuple
    unlabeled = {k: v for k, v in batch.items() if k != "labels"}
    assert tuned(**unlabeled).logits.shape == (2, batch["input_ids"].shape[1], 64)
    tuned.eval()
    assert tuned(**batch).logits is not None
    off = dt.get_tuned_model(TINY_MODELS["llama"].fresh(), CONFIGS["lora"](), fused_loss=False).train()
    assert off.fused_loss is False and off(**batch).logits is not None


def test_models_the_fused_path_cannot_prove_equal_take_the_standard_forward():
    batch = _batch(padded=False)
    head_trains = dt.get_tuned_model(
        TINY_MODELS["llama"].fresh(), dt.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])
    ).train()
    assert head_trains(**batch).logits is not None
    tuned = _tuned("lora")
    assert "logits_to_keep" in fused_forward.why_not_fused(tuned.model, {**batch, "logits_to_keep": 1})
    assert "logits_to_keep" in fused_forward.why_not_fused(
        tuned.model, {**batch, "logits_to_keep": torch.tensor([1, 2])}
    )
    assert "return_dict" in fused_forward.why_not_fused(tuned.model, {**batch, "return_dict": False})
    tuned.model.config.return_dict = False
    assert "tuple outputs" in fused_forward.why_not_fused(tuned.model, batch)
    tuned.model.config.return_dict = True
    handle = tuned.model.lm_head.register_forward_hook(lambda module, args, out: out * 2)
    try:
        assert "hooks" in fused_forward.why_not_fused(tuned.model, batch)
        assert tuned(**batch).logits is not None
    finally:
        handle.remove()
    tuned.model.config.final_logit_softcapping = 30.0
    assert tuned(**batch).logits is not None


def test_gpt2_conv1d_model():
    tiny = TINY_MODELS["gpt2"]
    tuned = dt.get_tuned_model(tiny.fresh(), dt.LoraConfig(target_modules=tiny.targets["linear"], r=4)).train()
    contract.perturb(tuned)
    batch = {**tiny.make_inputs(0)}
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][0, :2] = -100
    torch.manual_seed(0)  # GPT-2 has dropout: the same seed gives both forwards the same masks
    loss, out, grads = _loss_and_grads(tuned, lambda m: m(**batch))
    tuned.fused_loss = False
    torch.manual_seed(0)
    ref_loss, _, ref_grads = _loss_and_grads(tuned, lambda m: m(**batch))
    assert out.logits is None
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-4)


def test_the_stack_refuses_raw_ids_while_an_input_adapter_is_active():
    batch = _batch(padded=False)
    tuned = _tuned("prompt")
    with pytest.raises(dt.ConfigError, match="virtual tokens would be skipped"):
        tuned.model.model(input_ids=batch["input_ids"])
    tuned.model.model(**tuned.model_inputs(input_ids=batch["input_ids"]))  # rewritten: virtual-token embeddings
    with tuned.disable_adapter():
        tuned.model.model(input_ids=batch["input_ids"])
    tuned.eval()
    assert tuned.generate(input_ids=batch["input_ids"][:1, :4], max_new_tokens=3, do_sample=False).shape[1] > 4
    tuned.unload()
    tuned.model.model(input_ids=batch["input_ids"])  # the guard left with the adapter


_TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
FAMILIES = {  # name: (config, whether the fused path may be taken)
    "qwen2": (lambda t: t.Qwen2Config(**_TINY, num_key_value_heads=2), True),
    "gemma": (lambda t: t.GemmaConfig(**_TINY, num_key_value_heads=2, head_dim=8), True),  # tied, scaled embeddings
    "phi3": (lambda t: t.Phi3Config(**_TINY, num_key_value_heads=2, pad_token_id=0), True),
    "opt": (
        lambda t: t.OPTConfig(
            vocab_size=96,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=48,
            dropout=0.0,
            word_embed_proj_dim=16,
        ),
        True,
    ),  # fmt: skip
    "mixtral": (
        lambda t: t.MixtralConfig(**_TINY, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        True,
    ),
    "mixtral-aux": (
        lambda t: t.MixtralConfig(
            **_TINY, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True
        ),
        False,
    ),  # fmt: skip
    "gemma2": (lambda t: t.Gemma2Config(**_TINY, num_key_value_heads=2, head_dim=8), False),  # soft-capped logits
    "cohere": (lambda t: t.CohereConfig(**_TINY, num_key_value_heads=2, logit_scale=0.5), False),  # scaled logits
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_other_architectures_give_the_standard_loss(family):
    import transformers

    make, fusable = FAMILIES[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make(transformers))
    tuned = dt.get_tuned_model(model, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100
    loss, out, grads = _loss_and_grads(tuned, lambda m: m(input_ids=ids, labels=labels))
    assert (out.logits is None) == fusable
    tuned.fused_loss = False
    ref_loss, _, ref_grads = _loss_and_grads(tuned, lambda m: m(input_ids=ids, labels=labels))
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-4)


def test_under_bf16_autocast_the_loss_is_the_standard_one():
    """The standard head runs in the autocast dtype; the fused path casts to it too (same loss)."""
    batch = _batch(padded=True)
    tuned = _tuned("lora")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, out, grads = _loss_and_grads(tuned, lambda m: m(**batch))
    tuned.fused_loss = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, _, ref_grads = _loss_and_grads(tuned, lambda m: m(**batch))
    assert out.logits is None
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for ours, theirs in zip(grads, ref_grads):  # bf16 products summed in another order: bf16-level agreement
        assert float((ours - theirs).norm() / theirs.norm()) < 3e-2


def test_a_head_in_another_dtype_than_the_hidden_states_runs_the_models_own_tail():
    batch = _batch(padded=False)
    tuned = _tuned("lora")
    tuned.model.lm_head.to(torch.bfloat16)  # fp32 hidden states, bf16 head: the model's own forward fails too
    errors = []
    for fused in (True, False):
        tuned.fused_loss = fused
        with pytest.raises(RuntimeError) as caught:
            tuned(**batch)
        errors.append(str(caught.value))
    assert errors[0] == errors[1]


def test_a_deep_copy_keeps_its_own_guard():
    import copy

    tuned = _tuned("prompt")
    twin = copy.deepcopy(tuned)
    ids = _batch(padded=False)["input_ids"]
    with tuned.disable_adapter():  # the original's state does not decide for the copy
        with pytest.raises(dt.ConfigError, match="virtual tokens would be skipped"):
            twin.model.model(input_ids=ids)

"""LoRA specifics: initialisations, patterns, bias modes, dtypes, safe merge."""

import math

import pytest
import torch

import deltatune as dt
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS, build_tiny

LLAMA = TINY_MODELS["llama"]


@pytest.mark.parametrize("init", [True, "gaussian", "pissa", "pissa_niter_4", "olora"])
def test_initialisations_leave_the_output_unchanged(init):
    model = build_tiny("llama")
    base_out = contract.run(LLAMA, model)
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    tuned = dt.get_tuned_model(model, dt.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=init))
    torch.testing.assert_close(contract.run(LLAMA, tuned), base_out, atol=1e-5, rtol=0)
    q_after = tuned.model.model.layers[0].self_attn.q_proj.base_layer.weight
    rewrites_base = init not in (True, "gaussian")
    assert (not torch.allclose(q_before, q_after)) == rewrites_base


def test_init_false_changes_the_output_at_once():
    base_out = contract.run(LLAMA, build_tiny("llama"))
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    assert (contract.run(LLAMA, tuned) - base_out).abs().max() > 1e-4


def test_pissa_merge_and_unload_gives_the_full_model():
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["q_proj"], r=2, init_lora_weights="pissa"))
    contract.perturb(tuned)
    out = contract.run(LLAMA, tuned)
    merged = tuned.merge_and_unload()
    torch.testing.assert_close(contract.run(LLAMA, merged), out, atol=1e-4, rtol=1e-4)


def test_rank_and_alpha_patterns_apply_per_module():
    config = dt.LoraConfig(
        target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
        rank_pattern={r"layers\.1\.self_attn\.q_proj": 2}, alpha_pattern={"v_proj": 32},
    )  # fmt: skip
    tuned = dt.get_tuned_model(build_tiny("llama"), config)
    layers = tuned.model.model.layers
    assert layers[0].self_attn.q_proj.deltas["default"].r == 4
    assert layers[1].self_attn.q_proj.deltas["default"].r == 2
    assert layers[1].self_attn.q_proj.deltas["default"].lora_A.weight.shape == (2, 16)
    assert layers[0].self_attn.v_proj.deltas["default"].scale == 32 / 4
    assert layers[0].self_attn.q_proj.deltas["default"].scale == 8 / 4


def test_rslora_scale_is_alpha_over_sqrt_r():
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["q_proj"], r=16, lora_alpha=8, use_rslora=True))
    assert tuned.model.model.layers[0].self_attn.q_proj.deltas["default"].scale == pytest.approx(8 / math.sqrt(16))


@pytest.mark.parametrize(("bias", "expected"), [("none", 0), ("lora_only", 4), ("all", None)])
def test_bias_modes_train_and_save_the_right_biases(bias, expected):
    model = build_tiny("bert")
    all_biases = [n for n, _ in model.named_parameters() if n.endswith("bias") and not n.startswith("classifier")]
    tuned = dt.get_tuned_model(model, dt.LoraConfig(target_modules=["query", "value"], bias=bias))
    saved_biases = [k for k in tuned.adapter_state_dict() if k.endswith("bias") and not k.startswith("classifier")]
    assert len(saved_biases) == (len(all_biases) if expected is None else expected)
    trainable = {n for n, p in tuned.model.named_parameters() if p.requires_grad}
    assert set(saved_biases) <= trainable


def test_low_precision_base_keeps_fp32_adapter_and_computes_in_input_dtype():
    model = build_tiny("llama").to(torch.bfloat16)
    tuned = dt.get_tuned_model(model, dt.LoraConfig(target_modules=["q_proj", "v_proj"], use_dora=True))
    contract.perturb(tuned)
    adapter_dtypes = {p.dtype for n, p in tuned.model.named_parameters() if ".deltas." in n}
    assert adapter_dtypes == {torch.float32}
    q_proj = tuned.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    assert q_proj(x).dtype == torch.bfloat16
    logits = LLAMA.output(tuned(**LLAMA.make_inputs(0)))
    assert logits.dtype == torch.bfloat16
    logits.float().pow(2).mean().backward()
    grads = [p.grad for n, p in tuned.model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_safe_merge_refuses_non_finite_and_leaves_base_untouched():
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["q_proj", "v_proj"]))
    contract.perturb(tuned)
    before = contract.base_state(tuned.model)
    with torch.no_grad():
        tuned.model.model.layers[1].self_attn.v_proj.deltas["default"].lora_B.weight[0, 0] = float("inf")
    with pytest.raises(dt.MergeError, match="non-finite"):
        tuned.merge_adapter()
    for key, value in tuned.model.state_dict().items():
        if ".deltas." not in key:
            assert torch.equal(value, before[key]), f"{key} changed by a refused merge"
    assert all(not w.merged for w in tuned.model.modules() if hasattr(w, "merged"))


def test_several_active_adapters_compose_additively():
    base_out = contract.run(LLAMA, build_tiny("llama"))
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    out_a = contract.run(LLAMA, tuned)
    tuned.add_adapter("b", dt.LoraConfig(target_modules=["v_proj"], init_lora_weights=False))
    tuned.set_adapter("b")
    out_b = contract.run(LLAMA, tuned)
    tuned.set_adapter(["default", "b"])
    both = contract.run(LLAMA, tuned)
    assert (both - out_a).abs().max() > 1e-4 and (both - out_b).abs().max() > 1e-4
    tuned.merge_adapter()
    torch.testing.assert_close(contract.run(LLAMA, tuned), both, atol=1e-4, rtol=1e-4)
    tuned.unmerge_adapter()
    with tuned.disable_adapter():
        torch.testing.assert_close(contract.run(LLAMA, tuned), base_out, atol=1e-5, rtol=0)


def test_dropout_only_in_training_and_only_on_the_adapter_path():
    tuned = dt.get_tuned_model(build_tiny("mlp"), dt.LoraConfig(target_modules=["lin0"], lora_dropout=0.5, init_lora_weights=False))
    x = torch.randn(4, 12)
    tuned.eval()
    assert torch.equal(tuned(x), tuned(x))
    tuned.train()
    torch.manual_seed(0)
    first = tuned(x)
    torch.manual_seed(1)
    assert not torch.equal(first, tuned(x))
    with tuned.disable_adapter():
        assert torch.equal(tuned(x), tuned(x))


def test_new_adapter_follows_the_models_eval_mode():
    model = build_tiny("mlp").eval()
    tuned = dt.get_tuned_model(model, dt.LoraConfig(target_modules=["lin0"], lora_dropout=0.5, init_lora_weights=False))
    assert not any(m.training for m in tuned.modules())
    x = torch.randn(4, 12)
    assert torch.equal(tuned(x), tuned(x))


class _KeywordOnly(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(6, 6)

    def forward(self, x):
        return self.inner(input=x)  # keywords only, as diffusers calls its blocks


def test_keyword_only_calls_reach_the_adapter():
    model = _KeywordOnly().eval()
    x = torch.randn(2, 6)
    base = model(x)
    tuned = dt.get_tuned_model(model, dt.LoraConfig(target_modules=["inner"], init_lora_weights=False))
    assert (tuned(x) - base).abs().max() > 1e-4


def test_inference_adds_in_place_only_into_outputs_nobody_else_holds():
    torch.manual_seed(0)
    tuned = dt.get_tuned_model(
        torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4)), dt.LoraConfig(target_modules=["0", "1"], r=2)
    )
    contract.perturb(tuned)
    first, second = tuned.model[0], tuned.model[1]
    held, copies = [], []
    second.base_layer.register_forward_hook(lambda module, args, out: held.append(out))
    second.base_layer.register_forward_hook(lambda module, args, out: copies.append(out.clone()))
    x = torch.randn(3, 6)
    with torch.no_grad():
        fast = tuned(x)  # layer 0: added in place into its base output; layer 1 (hooked): not
        delta = first.deltas["default"]
        by_hand = first.base_layer(x) + delta.scale * (x @ delta.lora_A.weight.T) @ delta.lora_B.weight.T
        torch.testing.assert_close(first(x), by_hand, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(held[0], copies[0], atol=0, rtol=0)  # what the hook holds is untouched
    torch.testing.assert_close(fast, tuned(x).detach(), atol=1e-6, rtol=1e-6)  # = the autograd path


@pytest.mark.parametrize("use_dora", [False, True])
def test_autocast_over_an_fp32_model_trains(use_dora):
    """bf16 autocast over fp32 weights (accelerate / Trainer mixed precision): same loss within bf16 error."""
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules="all-linear", r=4, use_dora=use_dora))
    contract.perturb(tuned)
    inputs = LLAMA.make_inputs(0)
    reference = tuned(**inputs, labels=inputs["input_ids"]).loss.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = tuned(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    torch.testing.assert_close(loss.float(), reference, atol=5e-2, rtol=2e-2)
    grads = [p.grad for p in tuned.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in tuned.parameters() if p.requires_grad)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(tuned(**inputs).logits).all()


def test_a_linear_whose_weight_left_its_parameters_takes_the_general_path():
    """Some quantizers replace `weight` with a plain tensor attribute: the fast path must not read `_parameters`."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5)
    weight = layer.weight.detach().clone()
    del layer.weight
    layer.weight = weight  # a plain attribute now, as e.g. some quantizers leave it
    tuned = dt.get_tuned_model(torch.nn.Sequential(layer), dt.LoraConfig(target_modules=["0"], r=2, init_lora_weights=False))
    delta = tuned.model[0].deltas["default"]
    x = torch.randn(3, 6)
    expected = x @ weight.T + layer.bias + delta.scale * (x @ delta.lora_A.weight.T) @ delta.lora_B.weight.T
    assert tuned.model[0].base_layer._parameters.get("weight") is None
    torch.testing.assert_close(tuned(x), expected, atol=1e-6, rtol=1e-6)

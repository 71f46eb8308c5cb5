"""The fused chunked cross-entropy equals the plain loss, in value and in adapter gradients."""

import pytest
import torch

import deltatune as dt
from deltatune.ops import causal_lm_loss, fused_ce, fused_linear_cross_entropy
from deltatune.ops.fused_ce import fused_linear_cross_entropy as fused
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_kernel_matches_cross_entropy(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=gen, requires_grad=True)
    weight, bias = torch.randn(20, 8, generator=gen), torch.randn(20, generator=gen)
    labels = torch.randint(0, 20, (10,), generator=gen)
    labels[[2, 7]] = -100
    ours = fused_linear_cross_entropy(hidden, weight, bias, labels, chunk_tokens=chunk)
    (grad_ours,) = torch.autograd.grad(ours * 0.5, hidden)
    plain = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, labels, reduction="sum")
    (grad_plain,) = torch.autograd.grad(plain * 0.5, hidden)
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_ours, grad_plain, atol=1e-5, rtol=1e-5)


def test_trainable_head_is_refused():
    with pytest.raises(ValueError, match="frozen head"):
        fused_linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 3, requires_grad=True), None, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_lm_loss_and_adapter_grads_match_the_plain_path(model_name):
    tiny = TINY_MODELS[model_name]
    tuned = dt.get_tuned_model(tiny.fresh(), dt.LoraConfig(target_modules=tiny.targets["linear"], r=4))
    contract.perturb(tuned)
    inputs = tiny.make_inputs(0)
    labels = inputs["input_ids"].clone()
    labels[0, :3] = -100
    loss_sum, count = causal_lm_loss(tuned, inputs["input_ids"], labels, inputs["attention_mask"])
    grads = torch.autograd.grad(loss_sum / count, [p for p in tuned.parameters() if p.requires_grad])
    plain = tuned(**inputs, labels=labels).loss
    plain_grads = torch.autograd.grad(plain, [p for p in tuned.parameters() if p.requires_grad])
    assert int(count) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss_sum / count, plain, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(grads, plain_grads):
        assert theirs.abs().max() > 0
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-4)


def test_falls_back_when_the_head_trains():
    tiny = TINY_MODELS["llama"]
    tuned = dt.get_tuned_model(tiny.fresh(), dt.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    inputs = tiny.make_inputs(0)
    loss_sum, count = causal_lm_loss(tuned, inputs["input_ids"], inputs["input_ids"], inputs["attention_mask"])
    loss_sum.backward()
    head = tuned.model.lm_head.modules_to_save["default"]
    assert head.weight.grad is not None and head.weight.grad.abs().max() > 0


@pytest.mark.parametrize(
    "config",
    [
        dt.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
        dt.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16, task_type="CAUSAL_LM"),
        dt.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    ],
    ids=lambda c: type(c).__name__,
)
def test_input_adapters_take_the_fused_path_with_aligned_labels(config, monkeypatch):
    tiny = TINY_MODELS["llama"]
    tuned = dt.get_tuned_model(tiny.fresh(), config)
    assert tuned.rewrites_inputs
    inputs = tiny.make_inputs(0)
    labels = inputs["input_ids"].clone()
    labels[0, :2] = -100
    params = [p for p in tuned.parameters() if p.requires_grad]
    plain = tuned(**inputs, labels=labels).loss
    plain_grads = torch.autograd.grad(plain, params)
    calls = []
    monkeypatch.setattr(fused_ce, "fused_linear_cross_entropy", lambda *a, **k: calls.append(1) or fused(*a, **k))
    loss_sum, count = causal_lm_loss(tuned, inputs["input_ids"], labels, inputs["attention_mask"])
    assert calls, "the fused head path was not taken"
    grads = torch.autograd.grad(loss_sum / count, params)
    torch.testing.assert_close(loss_sum / count, plain, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(grads, plain_grads):
        assert theirs.abs().max() > 0
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("masked", ["none", "all", "most"])
def test_only_supervised_tokens_reach_the_head(masked):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(12, 8, generator=gen, requires_grad=True)
    weight = torch.randn(30, 8, generator=gen)
    labels = torch.randint(0, 30, (12,), generator=gen)
    if masked == "all":
        labels[:] = -100
    elif masked == "most":
        labels[[0, 1, 2, 4, 5, 7, 8, 9, 11]] = -100
    ours = fused_linear_cross_entropy(hidden, weight, None, labels, chunk_tokens=2)
    (grad_ours,) = torch.autograd.grad(ours, hidden)
    plain = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    (grad_plain,) = torch.autograd.grad(plain, hidden)
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_ours, grad_plain, atol=1e-5, rtol=1e-5)
    assert (grad_ours[labels == -100] == 0).all()


def test_low_precision_head_keeps_the_softmax_in_fp32():
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, 16, generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(50, 16, generator=gen).bfloat16()
    labels = torch.randint(0, 50, (6,), generator=gen)
    ours = fused_linear_cross_entropy(hidden, weight, None, labels, chunk_tokens=4)
    (grad_ours,) = torch.autograd.grad(ours, hidden)
    assert ours.dtype == torch.float32 and grad_ours.dtype == torch.bfloat16
    plain = torch.nn.functional.cross_entropy((hidden @ weight.T).float(), labels, reduction="sum")
    (grad_plain,) = torch.autograd.grad(plain, hidden)
    torch.testing.assert_close(ours, plain, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(grad_ours.float(), grad_plain.float(), atol=2e-2, rtol=2e-2)

"""LoRA as one autograd node (deltatune/ops/lora_linear.py) against the op-by-op formula."""

import pytest
import torch

import deltatune as dt
from deltatune.ops.lora_linear import lora_linear
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS, build_tiny

LLAMA = TINY_MODELS["llama"]


def _reference(x, dropped, weight, bias, a, b, scale):
    source = x if dropped is None else dropped
    return torch.nn.functional.linear(x, weight, bias) + scale * (source @ a.to(x.dtype).t()) @ b.to(x.dtype).t()


def _leaves(dtype, *, bias=True, dropout=False, x_grad=True):
    generator = torch.Generator().manual_seed(0)

    def make(*shape, dtype=dtype, grad=False):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(dtype).requires_grad_(grad)

    x = make(7, 6, grad=x_grad)
    dropped = make(7, 6, grad=True) if dropout else None
    return (
        x,
        dropped,
        make(5, 6),
        make(5) if bias else None,
        make(3, 6, dtype=torch.float32, grad=True),
        make(5, 3, dtype=torch.float32, grad=True),
    )


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [False, True])
def test_output_and_gradients_match_the_formula(dtype, tolerance, bias, dropout):
    leaves = _leaves(dtype, bias=bias, dropout=dropout)
    fused = lora_linear(*leaves, 1.7)
    grad = torch.randn(fused.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    fused.backward(grad)
    got = [t.grad.clone() for t in leaves if t is not None and t.requires_grad]
    for t in leaves:
        if t is not None:
            t.grad = None
    expected_out = _reference(*leaves, 1.7)
    expected_out.backward(grad)
    expected = [t.grad for t in leaves if t is not None and t.requires_grad]
    torch.testing.assert_close(fused.float(), expected_out.float(), atol=tolerance, rtol=tolerance)
    assert len(got) == len(expected) == (4 if dropout else 3)  # x, dropped, A, B
    for mine, theirs in zip(got, expected):
        assert mine.dtype == theirs.dtype  # A and B get fp32 gradients on a bf16 input
        torch.testing.assert_close(mine.float(), theirs.float(), atol=tolerance * 4, rtol=tolerance * 4)


def test_input_without_gradient_gets_none_and_adapters_still_train():
    x, _, weight, bias, a, b = _leaves(torch.float32, x_grad=False)
    lora_linear(x, None, weight, bias, a, b, 0.5).sum().backward()
    assert x.grad is None and a.grad is not None and b.grad is not None


def test_a_trainable_base_is_refused():
    x, _, weight, bias, a, b = _leaves(torch.float32)
    with pytest.raises(ValueError, match="frozen base"):
        lora_linear(x, None, weight.requires_grad_(True), bias, a, b, 1.0)


def _train_step(tuned):
    inputs = LLAMA.make_inputs(0)
    loss = tuned(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in tuned.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_dora", [False, True])
def test_training_uses_one_node_and_matches_the_op_by_op_path(monkeypatch, use_dora):
    """The same step through the one-node path and through the op-by-op path: same loss and gradients."""
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules="all-linear", r=4, use_dora=use_dora))
    contract.perturb(tuned)
    nodes = []
    inputs = LLAMA.make_inputs(0)
    out = tuned(**inputs).logits
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    assert any("LoraLinearFunction" in name for name in nodes)
    loss, grads = _train_step(tuned)
    tuned.zero_grad(set_to_none=True)
    monkeypatch.setattr("deltatune.tuners.lora._one_node", lambda *args: False)
    loss_ref, grads_ref = _train_step(tuned)
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-6)
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules="all-linear", r=4))
    contract.perturb(plain)
    loss, grads = _train_step(plain)
    plain.zero_grad(set_to_none=True)
    plain.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain.get_base_model().enable_input_require_grads()
    loss_gc, grads_gc = _train_step(plain)
    torch.testing.assert_close(loss, loss_gc, atol=1e-6, rtol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_gc[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_torch_compile_traces_one_graph_and_matches_eager():
    """LoRA (one-node op) and the lean MLPs compile without graph breaks and train the same."""
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules="all-linear", r=4))
    contract.perturb(tuned)
    inputs = LLAMA.make_inputs(0)
    loss, grads = _train_step(tuned)
    tuned.zero_grad(set_to_none=True)
    explained = torch._dynamo.explain(tuned)(**inputs, labels=inputs["input_ids"])
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    torch._dynamo.reset()
    compiled_loss, compiled_grads = _train_step(torch.compile(tuned))
    compiled_grads = {name.removeprefix("_orig_mod."): grad for name, grad in compiled_grads.items()}
    assert compiled_grads.keys() == grads.keys()
    torch.testing.assert_close(compiled_loss, loss, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(compiled_grads[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)

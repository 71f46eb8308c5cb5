"""Each virtual-token tuner learns: 30 Adam steps on one fixed causal-LM batch cut the loss clearly.

The base is the tiny Llama architecture with weights drawn at initializer_range=0.5: at the usual 0.02
its logits are almost uniform whatever the input, so no input-side method could move the loss; here the
frozen model is sensitive to its inputs, as a trained one is. A tuner whose gradients do not reach its
tensors (or whose tensors do not reach the model) fails here.
"""

import pytest
import torch

import deltatune as dt

STEPS = 30
MIN_DROP = 0.2

CASES = {
    "prompt_tuning": (dt.PromptTuningConfig(num_virtual_tokens=4), 0.1),
    "p_tuning_mlp": (dt.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=32), 0.02),
    "p_tuning_lstm": (
        dt.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"),
        0.03,
    ),
    "prefix_tuning": (dt.PrefixTuningConfig(num_virtual_tokens=4), 0.1),
    "prefix_projection": (
        dt.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=32),
        0.01,
    ),
}


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.5,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("name", list(CASES))
def test_input_tuner_learns_causal_lm(name):
    config, lr = CASES[name]
    torch.manual_seed(1)
    tuned = dt.get_tuned_model(_llama(), config)
    tuned.train()
    ids = torch.randint(1, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding, ignored by the loss
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(STEPS):
        loss = tuned(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] <= (1 - MIN_DROP) * losses[0], (
        f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f} after {STEPS} steps"
    )
    assert not any(p.requires_grad for p in tuned.model.parameters()), "a base parameter trained"


@pytest.mark.parametrize(
    "config", [dt.PromptTuningConfig(num_virtual_tokens=3), dt.PTuningConfig(num_virtual_tokens=3)]
)
def test_virtual_tokens_get_gradients_with_gradient_checkpointing(config):
    """The prompts make inputs_embeds require grad, so even reentrant checkpointing reaches them."""
    model = _llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    tuned = dt.get_tuned_model(model, config)
    tuned.train()
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    tuned(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in tuned.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_prefix_tuning_refuses_gradient_checkpointing():
    model = _llama()
    model.gradient_checkpointing_enable()
    with pytest.raises(dt.ConfigError, match="gradient checkpointing"):
        dt.get_tuned_model(model, dt.PrefixTuningConfig(num_virtual_tokens=3))

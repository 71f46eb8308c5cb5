"""The peft method family beyond LoRA/IA3 (LoHa, LoKr, OFT, ...): each learns a tiny fixed causal-LM task
on a tiny Llama with gradient checkpointing on (the eval-mode loss falls), and every adapter tensor gets a
gradient through it."""

import pytest
import torch

import deltatune as dt
from deltatune.core.registry import get_spec
from deltatune.testing.tiny_models import build_tiny

STEPS = 12
MIN_DROP = 0.3
IDS = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "down_proj"]

# tuner -> (config fields, learning rate[, least relative loss drop when not MIN_DROP])
METHODS = {
    "loha": ({"r": 4, "alpha": 4}, 2e-2),
    "lokr": ({"r": 4, "alpha": 4}, 2e-2),
    "oft": ({"oft_block_size": 16}, 1e-1, 0.15),  # rotations only: the slowest learner here
    "fourierft": ({"n_frequency": 64, "scaling": 50.0, "init_weights": True}, 2e-2),
    "miss": ({"r": 4}, 2e-2),
    "c3a": ({"block_size": 4, "init_weights": True}, 2e-1),
    "delora": ({"r": 4}, 5e-2),
    "road": ({"variant": "road_4", "group_size": 4}, 2e-1, 0.15),  # rotates outputs only
    "gralora": ({"r": 4, "alpha": 8}, 2e-2),
    "shira": ({"r": 2, "random_seed": 0}, 5e-2),
    "vera": ({"r": 16}, 5e-2),
    "randlora": ({"r": 4, "randlora_alpha": 4}, 2e-2),
    "vblora": ({"r": 4, "num_vectors": 32, "vector_length": 8}, 5e-2),
    "waveft": ({"n_frequency": 64, "scaling": 50.0}, 2e-2),
    "hira": ({"r": 8}, 2e-1, 0.15),  # scaled by the small random base weights
    "pvera": ({"r": 16, "generator_seed": 0}, 5e-2, 0.05),  # trained on sampled codes: noisy steps, slower
    "peanut": ({"r": 8, "depth": 1}, 5e-2),
    "beft": ({}, 5e-2),
    "deft": ({"r": 4, "alpha": 4}, 2e-2),
    "supertuning": ({"sparsity": 0.9}, 5e-2),
    "glora": ({"r": 4}, 2e-2),
    "unilora": ({"r": 4, "theta_d_length": 256}, 5e-2),
    "hra": ({"r": 8}, 5e-2, 0.15),  # reflections only, like OFT
    "boft": ({"boft_block_size": 4, "boft_n_butterfly_factor": 2}, 1e-1),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_learns_with_gradient_checkpointing(name):
    fields, lr, *drop = METHODS[name]
    config = get_spec(name).config(target_modules=TARGETS, task_type="CAUSAL_LM", **fields)
    model = build_tiny("llama")
    with torch.no_grad():  # the random head's logits are tiny (|W| ~ 0.02): scale it so the adapters can move the loss
        model.lm_head.weight.mul_(50)
    tuned = dt.get_tuned_model(model, config)
    tuned.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    before = _eval_loss(tuned)
    tuned.train()
    params = [p for p in tuned.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(STEPS):
        loss = tuned(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in params), "an adapter tensor got no gradient"
        if step == 2:  # after the zero-initialised factors moved, every tensor's gradient is non-zero
            assert all(p.grad.abs().sum() > 0 for p in params), "an adapter tensor's gradient is zero"
        opt.step()
    after = _eval_loss(tuned)
    assert after < before * (1 - (drop[0] if drop else MIN_DROP)), f"{name}: loss {before:.3f} -> {after:.3f}"


def _eval_loss(tuned) -> float:
    """The task's loss in eval mode (deterministic: no dropout, no sampled codes)."""
    tuned.eval()
    with torch.no_grad():
        return tuned(input_ids=IDS, labels=IDS).loss.item()


def test_cartridge_learns():
    """CARTRIDGE trains its KV cache (no gradient checkpointing: the cache lives outside the layers, as for prefix tuning)."""
    model = build_tiny("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    tuned = dt.get_tuned_model(model, dt.CartridgeConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    before = _eval_loss(tuned)
    tuned.train()
    opt = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(STEPS):
        loss = tuned(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _eval_loss(tuned)
    assert after < before * (1 - 0.15), f"cartridge: loss {before:.3f} -> {after:.3f}"

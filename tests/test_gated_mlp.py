"""Lean gated MLPs: same outputs and gradients as the model's own forward, fewer saved activations."""

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.ops import gated_mlp
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS, build_tiny

LLAMA = TINY_MODELS["llama"]


def _saved_bytes(fn) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _mlps(model):
    return [m for m in model.modules() if type(m).__name__.endswith("MLP")]


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_lean_mlp_gives_the_same_loss_and_gradients(targets):
    inputs = LLAMA.make_inputs(0)
    runs = []
    for lean in (False, True):
        torch.manual_seed(0)
        tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=targets, r=4), lean_activations=lean)
        contract.perturb(tuned)
        assert all(("forward" in m.__dict__) == lean for m in _mlps(tuned))
        loss = tuned(**inputs, labels=inputs["input_ids"]).loss
        params = [p for p in tuned.parameters() if p.requires_grad]
        runs.append((loss, torch.autograd.grad(loss, params)))
    (loss_own, grads_own), (loss_lean, grads_lean) = runs
    torch.testing.assert_close(loss_lean, loss_own, atol=1e-6, rtol=1e-6)
    for ours, theirs in zip(grads_lean, grads_own):
        assert theirs.abs().max() > 0
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_lean_mlp_keeps_less_for_backward():
    inputs = LLAMA.make_inputs(0)
    saved = {}
    for lean in (False, True):
        tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(target_modules=["q_proj"], r=4), lean_activations=lean)
        saved[lean] = _saved_bytes(lambda: tuned(**inputs, labels=inputs["input_ids"]).loss)
    config = build_tiny("llama").config
    tokens = inputs["input_ids"].numel()
    one_per_layer = tokens * config.intermediate_size * 4 * config.num_hidden_layers  # act(gate), fp32
    assert saved[False] - saved[True] == one_per_layer


def test_unload_restores_the_models_own_forward():
    model = build_tiny("llama")
    tuned = dt.get_tuned_model(model, dt.LoraConfig(target_modules=["q_proj"]))
    assert all("forward" in m.__dict__ for m in _mlps(model))
    tuned.unload()
    assert not any("forward" in m.__dict__ for m in _mlps(model))


class _OtherWiring(nn.Module):
    """Has the gated names but computes act(up) * gate: must be left alone."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 4)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


class _WithDropout(_OtherWiring):
    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        return self.down_proj(self.dropout(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


@pytest.mark.parametrize("cls", [_OtherWiring, _WithDropout])
def test_modules_that_compute_something_else_are_left_alone(cls):
    module = nn.Sequential(cls())
    undo = gated_mlp.install(module)
    assert "forward" not in module[0].__dict__
    undo()


def test_install_leaves_the_global_rng_alone():
    model = build_tiny("llama")
    state = torch.get_rng_state()
    undo = gated_mlp.install(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert any("forward" in m.__dict__ for m in _mlps(model))
    undo()

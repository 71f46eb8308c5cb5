"""Lean gated MLPs: same outputs and gradients as the model's own forward, fewer saved activations."""

import copy as copy_module

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.ops import gated_mlp
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS, build_tiny

LLAMA = TINY_MODELS["llama"]


def _saved_bytes(fn, monkeypatch, params) -> int:
    """Bytes of distinct non-parameter storage autograd keeps from one forward, recipes not counted."""
    storages: dict[int, int] = {}
    skip = {p.untyped_storage().data_ptr() for p in params}

    def record(t):
        if t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    plain_pack = gated_mlp._Recipe.pack

    def recipe_pack(recipe, t):  # inside down_proj the recipe's hooks are on top: count what they keep as is
        packed = plain_pack(recipe, t)
        return record(packed) if packed is t else packed

    monkeypatch.setattr(gated_mlp, "_outer_hooks_active", lambda: False)
    monkeypatch.setattr(gated_mlp._Recipe, "pack", recipe_pack)
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        fn()
    return sum(storages.values())


def _mlps(model):
    return [m for m in model.modules() if type(m).__name__.endswith("MLP")]


CONFIGS = {
    "lora-qv": lambda: dt.LoraConfig(target_modules=["q_proj", "v_proj"], r=4),
    "lora-all": lambda: dt.LoraConfig(target_modules="all-linear", r=4),
    "ia3": lambda: dt.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lean_mlp_gives_the_same_loss_and_gradients(name, checkpointing):
    inputs = LLAMA.make_inputs(0)
    runs = []
    for lean in (False, True):
        torch.manual_seed(0)
        model = build_tiny("llama")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
        tuned = dt.get_tuned_model(model, CONFIGS[name](), lean_activations=lean)
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


@pytest.mark.parametrize(("name", "per_layer"), [("lora-qv", 1), ("lora-all", 2), ("ia3", 2)])
def test_lean_mlp_keeps_less_for_backward(name, per_layer, monkeypatch):
    """act(gate) is never kept; the product act(gate) * up neither, when an adapter on down_proj would keep it."""
    inputs = LLAMA.make_inputs(0)
    saved = {}
    for lean in (False, True):
        tuned = dt.get_tuned_model(build_tiny("llama"), CONFIGS[name](), lean_activations=lean)
        saved[lean] = _saved_bytes(lambda t=tuned: t(**inputs, labels=inputs["input_ids"]).loss, monkeypatch, tuned.parameters())
    config = build_tiny("llama").config
    tokens = inputs["input_ids"].numel()
    one_per_layer = tokens * config.intermediate_size * 4 * config.num_hidden_layers  # fp32 (tokens, intermediate)
    assert saved[False] - saved[True] == per_layer * one_per_layer


@pytest.mark.parametrize("how", ["unload", "merge_and_unload"])
def test_unload_restores_the_models_own_forward(how):
    model = build_tiny("llama")
    tuned = dt.get_tuned_model(model, dt.LoraConfig(target_modules=["q_proj"]))
    assert all("forward" in m.__dict__ for m in _mlps(model))
    copy = copy_module.deepcopy(tuned)  # a copy's MLPs are its own, restored by its own unload
    returned = getattr(tuned, how)()
    assert returned is model and not any("forward" in m.__dict__ for m in _mlps(model))
    assert all("forward" in m.__dict__ for m in _mlps(copy.model))
    getattr(copy, how)()
    assert not any("forward" in m.__dict__ for m in _mlps(copy.model))


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
    assert gated_mlp.install(module) == 0
    assert "forward" not in module[0].__dict__


def test_install_leaves_the_global_rng_alone():
    model = build_tiny("llama")
    state = torch.get_rng_state()
    assert gated_mlp.install(model) == model.config.num_hidden_layers
    assert torch.equal(torch.get_rng_state(), state)
    assert all("forward" in m.__dict__ for m in _mlps(model))


def test_recipes_step_aside_for_other_saved_tensor_hooks():
    """Under someone else's hooks (checkpointing, offloading) the product is handed to them as a tensor."""
    inputs = LLAMA.make_inputs(0)
    tuned = dt.get_tuned_model(build_tiny("llama"), CONFIGS["ia3"]())
    config = tuned.model.config
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        tuned(**inputs, labels=inputs["input_ids"]).loss.backward()
    wide = [t for t in packed if t.dim() == 3 and t.shape[-1] == config.intermediate_size]
    # gate and up (kept by GatedProduct) plus the product (kept by IA3's scale on down_proj), per layer
    assert len(wide) == 3 * config.num_hidden_layers


class _GeluMLP(nn.Module):
    """Gemma-style: the canonical wiring with a tanh-GELU."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 4)
        self.act_fn = nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize(("cls", "silu"), [(_GeluMLP, False), (lambda: build_tiny("llama").model.layers[0].mlp, True)])
def test_any_activation_gets_exact_gradients(cls, silu):
    torch.manual_seed(0)
    module = nn.Sequential(cls())
    width = module[0].gate_proj.in_features
    x = torch.randn(2, 5, width, requires_grad=True)
    own = torch.autograd.grad(module(x).square().sum(), [x, *module.parameters()])
    assert gated_mlp.install(module) == 1
    assert "forward" in module[0].__dict__ and module[0]._lean_silu is silu
    lean = torch.autograd.grad(module(x).square().sum(), [x, *module.parameters()])
    for ours, theirs in zip(lean, own):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    gated_mlp.uninstall(module)
    assert "forward" not in module[0].__dict__ and "_lean_silu" not in module[0].__dict__

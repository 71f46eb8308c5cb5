"""Bottleneck adapters, ResTuning, side-tuning and LLaMA-Pro: each learns a tiny fixed task, the side
tuners never backpropagate through the backbone, and LLaMA-Pro's expanded model generates with a KV
cache exactly as without one."""

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.testing.tiny_models import TINY_MODELS, build_tiny

STEPS = 30
MIN_DROP = 0.3
IDS = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))


class NormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(12, 32)
        self.norm = nn.LayerNorm(32)
        self.lin1 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.norm(self.lin0(x))))))


def _train(tuned, loss_fn, lr: float) -> list[float]:
    tuned.train()
    opt = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(STEPS):
        loss = loss_fn(tuned)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _regression(config, lr: float) -> list[float]:
    torch.manual_seed(0)
    tuned = dt.get_tuned_model(NormMLP(), config)
    torch.manual_seed(1)
    teacher = NormMLP()
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = teacher(x) * 4  # (64, 3)
    return _train(tuned, lambda m: nn.functional.mse_loss(m(x), y), lr)


def _causal_lm(config, lr: float) -> list[float]:
    model = build_tiny("llama")
    with torch.no_grad():  # the random head's logits are tiny (|W| ~ 0.02); scale it so that tuners
        model.lm_head.weight.mul_(50)  # before the (frozen) final norm can move the loss
    tuned = dt.get_tuned_model(model, config)
    return _train(tuned, lambda m: m(input_ids=IDS, labels=IDS).loss, lr)


def _restuning(**extra) -> dt.ResTuningConfig:
    return dt.ResTuningConfig(
        stem_modules=r"model\.layers\.\d+", target_modules=r"model\.norm", task_type="CAUSAL_LM",
        tuner_cfg={"res_adapter": {"adapter_length": 8}}, **extra,
    )  # fmt: skip


CASES = {
    "adapter_houlsby": (_regression, dt.AdapterConfig(target_modules=["lin0", "lin1"], bottleneck_size=8), 2e-2),
    "adapter_parallel": (
        _regression,
        dt.AdapterConfig(target_modules=["lin0", "lin1"], adapter_type="parallel", bottleneck_size=8),
        2e-2,
    ),
    "side_tuning": (_regression, dt.SideTuningConfig(target_modules=["lin1"], side_hidden_size=16), 5e-2),
    "restuning": (_causal_lm, _restuning(), 1e-2),
    "llama_pro": (_causal_lm, dt.LlamaProConfig(num_new_blocks=1, task_type="CAUSAL_LM"), 1e-2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tuner_learns(name):
    task, config, lr = CASES[name]
    losses = task(config, lr)
    assert losses[-1] <= (1 - MIN_DROP) * losses[0], f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"


# -- the side tuners never backpropagate through the backbone -------------------------------------
SIDE_CONFIGS = {
    "restuning": _restuning(),
    "side_tuning": dt.SideTuningConfig(target_modules=["model.norm"], alpha_init=0.5, task_type="CAUSAL_LM"),
    "lora": dt.LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),  # the contrast
}


def _backbone_trace(config):
    """(loss, block outputs that hold an autograd graph, bytes autograd saved for backward)."""
    tuned = dt.get_tuned_model(build_tiny("llama"), config)
    tuned.train()
    recorded = []
    handles = [
        layer.register_forward_hook(lambda m, a, out: recorded.append(out.requires_grad))
        for layer in tuned.model.model.layers
    ]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
    ):
        loss = tuned(input_ids=IDS, labels=IDS).loss
    for handle in handles:
        handle.remove()
    loss.backward()
    return tuned, recorded, sum(saved)


@pytest.mark.parametrize("name", ["restuning", "side_tuning"])
def test_side_tuners_keep_the_backbone_out_of_backward(name):
    tuned, recorded, saved = _backbone_trace(SIDE_CONFIGS[name])
    _, lora_recorded, lora_saved = _backbone_trace(SIDE_CONFIGS["lora"])
    assert all(lora_recorded) and not any(recorded), "a backbone block's output is part of the autograd graph"
    assert saved < lora_saved / 2, f"saved for backward: {saved} bytes vs LoRA {lora_saved}"
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    frozen = [n for n, p in tuned.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen, f"backbone parameters got gradients: {frozen[:3]}"


def test_restuning_taps_are_detached_and_dropped_after_use():
    tuned = dt.get_tuned_model(build_tiny("llama"), _restuning())
    bypass = tuned.model.model.norm.deltas["default"]
    seen = []
    hook = tuned.model.model.norm.register_forward_pre_hook(lambda m, a: seen.extend(bypass.taps.values()))
    tuned(input_ids=IDS)
    hook.remove()
    assert len(seen) == 3 and not any(t.requires_grad for t in seen)  # root + two stems, detached
    assert not bypass.taps, "tapped activations outlived the forward"


# -- LLaMA-Pro --------------------------------------------------------------------------------------
def _expanded():
    tuned = dt.get_tuned_model(build_tiny("llama"), dt.LlamaProConfig(num_new_blocks=2, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for param in tuned.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    return tuned


def test_llama_pro_generates_the_same_with_and_without_kv_cache():
    tuned = _expanded()
    mask = torch.ones_like(IDS)
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with_cache = tuned.generate(IDS, **kwargs)
    assert torch.equal(with_cache, tuned.generate(IDS, use_cache=False, **kwargs))
    assert not torch.equal(with_cache, build_tiny("llama").generate(IDS, **kwargs)), "the new blocks change nothing"


def test_llama_pro_layout_save_and_unload(tmp_path):
    tuned = _expanded()
    layers = tuned.model.model.layers
    blocks = [layers[i].deltas["default"] if hasattr(layers[i], "deltas") else layers[i] for i in range(4)]
    assert [b.self_attn.layer_idx for b in blocks] == [0, 1, 2, 3]
    assert tuned.config.num_hidden_layers == 4
    tuned.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {k.split(".")[4] for k in keys} == {"1", "3"}, "only the new blocks (positions 1 and 3) are saved"
    assert "base_model.model.model.layers.1.self_attn.o_proj.weight" in keys
    loaded = dt.TunedModel.from_pretrained(build_tiny("llama"), tmp_path)
    torch.testing.assert_close(loaded(input_ids=IDS).logits, tuned(input_ids=IDS).logits, atol=1e-6, rtol=0)
    restored = tuned.unload()
    assert len(restored.model.layers) == 2 and restored.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in restored.model.layers] == [0, 1]
    torch.testing.assert_close(restored(input_ids=IDS).logits, build_tiny("llama")(input_ids=IDS).logits)


def test_llama_pro_model_is_unchanged_at_init():
    tiny = TINY_MODELS["llama"]
    base_out = tiny.fresh()(**tiny.make_inputs(0)).logits
    tuned = dt.get_tuned_model(tiny.fresh(), dt.LlamaProConfig(num_new_blocks=2))
    assert torch.equal(tuned(**tiny.make_inputs(0)).logits, base_out)

"""The registry's role maps against the real architectures in transformers.

For every family whose architecture ships with transformers, a tiny model of that architecture is
built from its config class (random weights): every module name of every role must match a module,
`all_linear` must be exactly the block's linear layers, and LoRA on the registry's default targets
trains (finite loss, non-zero gradient on every adapter tensor). Remote-code families (Qwen 1.x,
Baichuan, ChatGLM, InternLM) have no architecture here to check against.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import deltatune as dt
from deltatune.models import MODELS

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY, num_key_value_heads=2),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, num_key_value_heads=2),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=8),
    "mistral": lambda: transformers.MistralConfig(**TINY, num_key_value_heads=2),
    "bloom": lambda: transformers.BloomConfig(vocab_size=96, hidden_size=32, n_layer=2, n_head=4),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64),
}
NATIVE = sorted({spec.architecture for spec in MODELS.values() if spec.architecture in transformers.CONFIG_MAPPING})
# one registry entry per (architecture, role map): what a wrong role map would break
CASES = sorted({(spec.architecture, spec.family): name for name, spec in MODELS.items()}.values())
CASES = [name for name in CASES if MODELS[name].architecture in CONFIGS]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(architecture: str) -> nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[architecture]()).eval()


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)  # peft's list rule


def _linear_names(model: nn.Module) -> set[str]:
    kinds = (nn.Linear, transformers.pytorch_utils.Conv1D)
    return {name for name, module in model.named_modules() if isinstance(module, kinds) and name != "lm_head"}


def test_every_native_architecture_is_covered():
    assert set(NATIVE) <= set(CONFIGS), f"add a tiny config for {set(NATIVE) - set(CONFIGS)}"


@pytest.mark.parametrize("name", CASES)
def test_roles_name_real_modules_and_lora_trains(name):
    spec = MODELS[name]
    model = _build(spec.architecture)
    module_names = [n for n, _ in model.named_modules()]
    for role, targets in spec.roles.items():
        for target in targets:
            assert any(_matches(m, target) for m in module_names), (
                f"{name}: role {role} target {target!r} matches nothing"
            )
    linear = _linear_names(model)
    covered = {m for m in linear if any(_matches(m, t) for t in spec.roles["all_linear"])}
    assert covered == linear, f"{name}: all_linear misses {sorted(linear - covered)[:4]}"

    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=list(spec.default_targets), task_type=spec.task_type)
    tuned = dt.get_tuned_model(model, config)
    assert len(tuned.adapters["default"].targets) == 2 * len(spec.default_targets)  # 2 layers
    tuned.train()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    loss = tuned(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    trainable = {n: p for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for n, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        if "lora_B" in n:  # B starts at zero, so A's first gradient is zero by construction
            assert p.grad.abs().sum() > 0, f"{name}: no gradient reaches {n}"
    torch.optim.SGD(trainable.values(), lr=0.1).step()
    tuned.zero_grad()
    tuned(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in trainable.values()), f"{name}: a LoRA tensor gets no gradient"


@pytest.mark.parametrize("name", CASES)
def test_ia3_defaults_fit_the_architecture(name):
    spec = MODELS[name]
    fields = spec.targets_for("ia3")
    tuned = dt.get_tuned_model(_build(spec.architecture), dt.IA3Config(**fields, task_type=spec.task_type))
    assert len(tuned.adapters["default"].targets) == 2 * len(fields["target_modules"])

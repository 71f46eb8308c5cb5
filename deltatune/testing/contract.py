"""The tuner contract: invariants every registered tuner must keep, on any compatible model.

Used by tests/test_contract.py over every tuner x example config x tiny model, and reusable by
anyone registering a tuner of their own. Every check first makes the adapter non-trivial
(`perturb`) and asserts that it changes the output, so no equality below is vacuous.
"""

from __future__ import annotations

import functools
import json
import tempfile
from typing import Any

import torch
from torch import nn

from deltatune.core.config import ConfigError
from deltatune.core.registry import TunerSpec, get_spec, spec_for_config
from deltatune.core.tuned_model import TunedModel, get_tuned_model
from deltatune.core.wrapper import MergeError
from deltatune.testing.tiny_models import TINY_MODELS, TinyModel

ATOL = 1e-5


def make_config(spec: TunerSpec, example: dict[str, Any], tiny: TinyModel):
    """The example config aimed at this model's layers of the kinds the tuner adapts (None if none).

    A "select" or "structural" tuner's example, or one that names its own target_modules, runs as given,
    on the models where it applies (builds without a ConfigError)."""
    if spec.kind in ("select", "structural", "input") or "target_modules" in example:
        config = spec.config(**{"task_type": tiny.task_type, **example})
        return config if _selects_something(spec.name, json.dumps(example, sort_keys=True), tiny.name) else None
    targets = [name for kind in spec.dispatch for name in tiny.targets.get(kind, [])]
    if not targets:
        return None
    return spec.config(**{"target_modules": targets, "task_type": tiny.task_type, **example})


@functools.cache
def _selects_something(spec_name: str, example_json: str, tiny_name: str) -> bool:
    spec, tiny = get_spec(spec_name), TINY_MODELS[tiny_name]
    config = spec.config(**{"task_type": tiny.task_type, **json.loads(example_json)})
    try:
        TunedModel(tiny.fresh(), config)
    except ConfigError:
        return False
    return True


def run(tiny: TinyModel, model: nn.Module, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return tiny.output(model(**tiny.make_inputs(seed))).detach().clone()


def perturb(tuned: TunedModel, seed: int = 1, scale: float = 0.1, *, shared: bool = True) -> None:
    """Add seeded noise to every trainable tensor so the adapter changes the output.

    With shared=False, base tensors an adapter trains in place (LoRA's bias="all", as in peft) are
    left alone: those are shared by every adapter and by the base, so disabling or switching
    adapters cannot undo them, by design."""
    gen = torch.Generator().manual_seed(seed)
    shared_names = {n for a in tuned.adapters.values() for n in a.extra_params}
    with torch.no_grad():
        for name, param in named_parameters(tuned):
            if param.requires_grad and (shared or name not in shared_names):
                param.add_(torch.randn(param.shape, generator=gen).to(param) * scale)


def named_parameters(tuned: TunedModel):
    """(name, parameter) over tuned.model, named as there, then the tensors the TunedModel holds itself
    (an "input" adapter's virtual tokens), under their TunedModel names."""
    yield from tuned.model.named_parameters()
    for name, param in tuned.named_parameters():
        if not name.startswith("model."):
            yield name, param


def on_base_positions(out: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    """`out` restricted to the base output's positions when it covers extra leading ones (virtual tokens)."""
    if out.dim() > 1 and out.shape[1] > base_out.shape[1] and out.shape[2:] == base_out.shape[2:]:
        return out[:, -base_out.shape[1] :]
    return out


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tuned_pair(tiny: TinyModel, config) -> tuple[torch.Tensor, TunedModel]:
    """(base output, freshly tuned model)."""
    model = tiny.fresh()
    base_out = run(tiny, model)
    return base_out, get_tuned_model(model, config)


def assert_changes_output(tiny: TinyModel, tuned: TunedModel, base_out: torch.Tensor) -> torch.Tensor:
    out = run(tiny, tuned)
    change = (on_base_positions(out, base_out) - base_out).abs().max()
    assert change > 1e-4, "the perturbed adapter does not change the output (vacuous check)"
    return out


# -- the checks ------------------------------------------------------------------------------------
def check_identity_at_init(tiny: TinyModel, config) -> None:
    """Skipped for tuners declaring identity_at_init=False (their docstring says why)."""
    if not spec_for_config(config).identity_at_init:
        return
    base_out, tuned = tuned_pair(tiny, config)
    torch.testing.assert_close(run(tiny, tuned), base_out, atol=ATOL, rtol=0)


def check_only_tuner_params_train(tiny: TinyModel, config) -> None:
    model = tiny.fresh()
    base_names = {n for n, _ in model.named_parameters()}
    tuned = get_tuned_model(model, config)
    trainable = {n for n, p in named_parameters(tuned) if p.requires_grad}
    assert trainable, "no trainable parameter"
    saved = set(tuned.adapter_state_dict())
    extra = set(tuned.adapters["default"].extra_params)
    for name in trainable:
        assert name in extra or name not in base_names, f"base parameter {name} requires grad"
    # every trainable tensor of the model is saved (under its file key), and gets a gradient; tensors the
    # TunedModel holds itself are saved in their file form (check_save_load shows it restores the output)
    assert saved and len(saved) >= len(trainable & set(dict(tuned.model.named_parameters()))), "fewer saved tensors"
    tuned.train()
    out = tiny.output(tuned(**tiny.make_inputs(0)))
    out.float().pow(2).mean().backward()
    for name, param in named_parameters(tuned):
        if param.requires_grad:
            assert param.grad is not None, f"{name} got no gradient"
        else:
            assert param.grad is None, f"frozen {name} got a gradient"


def check_step_changes_only_tuner(tiny: TinyModel, config) -> None:
    _, tuned = tuned_pair(tiny, config)
    before = {n: p.detach().clone() for n, p in named_parameters(tuned)}
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=0.1)
    tuned.train()
    tiny.output(tuned(**tiny.make_inputs(0))).float().pow(2).mean().backward()
    opt.step()
    changed = {n for n, p in named_parameters(tuned) if not torch.equal(before[n], p.detach())}
    trainable = {n for n, p in named_parameters(tuned) if p.requires_grad}
    assert changed, "an optimizer step changed nothing"
    assert changed <= trainable, f"frozen tensors changed: {sorted(changed - trainable)[:5]}"


def check_merge_unmerge(tiny: TinyModel, config) -> None:
    """A tuner declaring mergeable=False (no weight-space form) must refuse merging, changing nothing."""
    base_out, tuned = tuned_pair(tiny, config)
    perturb(tuned)
    weights_before = base_state(tuned.model)
    out = assert_changes_output(tiny, tuned, base_out)
    if not spec_for_config(config).mergeable:
        for merge in (tuned.merge_adapter, tuned.merge_and_unload):
            try:
                merge()
            except MergeError as exc:
                assert "cannot be merged" in str(exc), f"unclear refusal: {exc}"
            else:
                raise AssertionError("a non-mergeable adapter was merged")
        for key, value in tuned.model.state_dict().items():
            torch.testing.assert_close(value, weights_before[key], atol=0, rtol=0, msg=f"refused merge changed {key}")
        torch.testing.assert_close(run(tiny, tuned), out, atol=ATOL, rtol=0)
        return
    tuned.merge_adapter()
    torch.testing.assert_close(run(tiny, tuned), out, atol=1e-4, rtol=1e-4)
    tuned.unmerge_adapter()
    for key, value in tuned.model.state_dict().items():
        torch.testing.assert_close(value, weights_before[key], atol=1e-5, rtol=1e-5, msg=f"unmerge did not restore {key}")
    torch.testing.assert_close(run(tiny, tuned), out, atol=ATOL, rtol=0)
    merged = tuned.merge_and_unload()
    torch.testing.assert_close(run(tiny, merged), out, atol=1e-4, rtol=1e-4)


def check_disable_is_base(tiny: TinyModel, config) -> None:
    base_out, tuned = tuned_pair(tiny, config)
    perturb(tuned, shared=False)
    out = assert_changes_output(tiny, tuned, base_out)
    with tuned.disable_adapter():
        torch.testing.assert_close(run(tiny, tuned), base_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(run(tiny, tuned), out, atol=ATOL, rtol=0)
    if not spec_for_config(config).mergeable:
        return
    tuned.merge_adapter()
    with tuned.disable_adapter():
        torch.testing.assert_close(run(tiny, tuned), base_out, atol=1e-4, rtol=1e-4)


def check_save_load(tiny: TinyModel, config) -> None:
    base_out, tuned = tuned_pair(tiny, config)
    perturb(tuned)
    out = assert_changes_output(tiny, tuned, base_out)
    with tempfile.TemporaryDirectory() as tmp:
        tuned.save_pretrained(tmp, save_embedding_layers=False)  # only the adapter's own tensors (peft's auto
        loaded = TunedModel.from_pretrained(tiny.fresh(), tmp)  # mode adds targeted embeddings' base tensors)
        from safetensors.torch import load_file

        keys = {k.removeprefix("base_model.model.") for k in load_file(f"{tmp}/adapter_model.safetensors")}
    assert keys == set(tuned.adapter_state_dict()), "saved keys differ from the adapter's declared tensors"
    torch.testing.assert_close(run(tiny, loaded), out, atol=ATOL, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters()), "inference-mode load left trainable tensors"


def check_unload_restores_tree(tiny: TinyModel, config) -> None:
    model = tiny.fresh()
    types_before = {n: type(m) for n, m in model.named_modules()}
    state_before = base_state(model)
    base_out = run(tiny, model)
    tuned = get_tuned_model(model, config)
    perturb(tuned, shared=False)
    assert_changes_output(tiny, tuned, base_out)
    restored = tuned.unload()
    assert {n: type(m) for n, m in restored.named_modules()} == types_before
    for key, value in restored.state_dict().items():
        torch.testing.assert_close(value, state_before[key], atol=0, rtol=0)
    torch.testing.assert_close(run(tiny, restored), base_out, atol=0, rtol=0)


def check_two_adapters_switch(tiny: TinyModel, config) -> None:
    base_out, tuned = tuned_pair(tiny, config)
    perturb(tuned, seed=1, shared=False)
    out_a = assert_changes_output(tiny, tuned, base_out)
    # only one adapter may train the (shared) base biases, as in peft: the second one trains none
    second = config.replace(bias="none") if getattr(config, "bias", "none") != "none" else config
    tuned.add_adapter("second", second)
    tuned.set_adapter("second")
    perturb(tuned, seed=2, shared=False)
    out_b = run(tiny, tuned)
    assert (out_b - out_a).abs().max() > 1e-4, "two perturbed adapters give the same output"
    trainable = [n for n, p in named_parameters(tuned) if p.requires_grad]
    assert trainable and all(".default." not in n for n in trainable), "inactive adapter still trainable"
    assert any(".second." in n for n in trainable), "active adapter not trainable"
    tuned.set_adapter("default")
    torch.testing.assert_close(run(tiny, tuned), out_a, atol=ATOL, rtol=0)
    tuned.delete_adapter("second")
    torch.testing.assert_close(run(tiny, tuned), out_a, atol=ATOL, rtol=0)


CHECKS = {
    "identity_at_init": check_identity_at_init,
    "only_tuner_params_train": check_only_tuner_params_train,
    "step_changes_only_tuner": check_step_changes_only_tuner,
    "merge_unmerge": check_merge_unmerge,
    "disable_is_base": check_disable_is_base,
    "save_load": check_save_load,
    "unload_restores_tree": check_unload_restores_tree,
    "two_adapters_switch": check_two_adapters_switch,
}

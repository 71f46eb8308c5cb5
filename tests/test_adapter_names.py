"""`adapter_names=[...]` (peft's meaning: one adapter per row, "__base__" for the base) over the whole
tuner registry: each row equals that row run alone with its adapter set, or the tuner refuses clearly."""

import pytest
import torch

from deltatune import all_specs
from deltatune.core.config import ConfigError
from deltatune.core.rows import MIXABLE_KINDS
from deltatune.core.tuned_model import get_tuned_model
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS

CASES = []
for spec in all_specs():
    for index, example in enumerate(spec.example_configs):
        for tiny in TINY_MODELS.values():
            if contract.make_config(spec, example, tiny) is not None:
                marks = () if tiny.name in ("llama", "mlp", "conv") else (pytest.mark.slow,)
                CASES.append(pytest.param(spec, example, tiny, id=f"{spec.name}{index}-{tiny.name}", marks=marks))


def _two_adapters(tiny, config, scale=0.1):
    tuned = get_tuned_model(tiny.fresh(), config)
    contract.perturb(tuned, seed=1, scale=scale, shared=False)
    try:
        tuned.add_adapter("second", config)
    except ConfigError as err:  # e.g. only one adapter may train the shared base biases
        pytest.skip(f"this config cannot be added twice: {err}")
    tuned.set_adapter("second")
    contract.perturb(tuned, seed=2, scale=scale, shared=False)
    tuned.set_adapter("default")
    return tuned


def _batch(inputs) -> int:
    return next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]


def _alone(tiny, tuned, inputs, name):
    with torch.no_grad():
        if name == "__base__":
            with tuned.disable_adapter():
                return tiny.output(tuned(**inputs)).clone()
        tuned.set_adapter(name)
        return tiny.output(tuned(**inputs)).clone()


@pytest.mark.parametrize(("spec", "example", "tiny"), CASES)
def test_each_row_equals_its_adapter_alone(spec, example, tiny):
    config = contract.make_config(spec, example, tiny)
    tuned = _two_adapters(tiny, config, scale=0.3)  # the two adapters' outputs well apart, so equality means something
    inputs = tiny.make_inputs(0)
    batch = _batch(inputs)
    pattern = ["second", "__base__", "default"] if spec.kind != "input" and batch >= 3 else ["second", "default"]
    names = [pattern[i % len(pattern)] for i in range(batch)]
    if spec.kind not in MIXABLE_KINDS:
        with pytest.raises(ConfigError, match=f"adapter_names: adapter 'second' is a {spec.name} adapter"):
            tuned(**inputs, adapter_names=names)
        return
    try:
        with torch.no_grad():
            mixed = tiny.output(tuned(**inputs, adapter_names=names))
    except ValueError as err:  # only a "select" tuner may train a layer whose input has no batch rows
        assert spec.kind == "select" and "run each adapter's rows in a batch of their own" in str(err), err
        return
    alone = {name: _alone(tiny, tuned, inputs, name) for name in set(names)}
    assert (alone["default"] - alone["second"]).abs().max() > 1e-4, "the two adapters agree (vacuous check)"
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-5, rtol=1e-5, msg=f"row {row} ({name})")


def _lm_case(name: str, example: dict):
    spec = next(s for s in all_specs() if s.name == name)
    tiny = TINY_MODELS["llama"]
    return _two_adapters(tiny, contract.make_config(spec, example, tiny), scale=0.5)


@pytest.mark.parametrize(
    ("name", "example", "pattern"),
    [
        ("lora", {"r": 4, "lora_alpha": 8, "use_dora": True}, ["default", "__base__", "second"]),
        ("ia3", {"feedforward_modules": ["down_proj"]}, ["second", "default", "__base__"]),
        ("prompt_tuning", {"num_virtual_tokens": 3}, ["second", "default", "default"]),
        ("prefix_tuning", {"num_virtual_tokens": 3}, ["default", "second", "second"]),
    ],
)
def test_generate_rows_equal_their_adapter_alone(name, example, pattern):
    tuned = _lm_case(name, example)
    with torch.no_grad():  # a seeded random tiny model: scale the head so greedy tokens are far apart
        tuned.get_base_model().lm_head.weight.mul_(30)
    ids = torch.randint(2, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = tuned.generate(input_ids=ids, adapter_names=pattern, **kwargs)
        outputs = {}
        for adapter in set(pattern):
            if adapter == "__base__":
                with tuned.disable_adapter():
                    outputs[adapter] = tuned.generate(input_ids=ids, **kwargs)
            else:
                tuned.set_adapter(adapter)
                outputs[adapter] = tuned.generate(input_ids=ids, **kwargs)
    assert not torch.equal(outputs["default"], outputs["second"]), "both adapters generate the same (vacuous)"
    for row, adapter in enumerate(pattern):
        assert torch.equal(mixed[row], outputs[adapter][row]), f"row {row} ({adapter})"


def test_unknown_name_lists_loaded_adapters():
    tuned = _lm_case("lora", {"r": 4})
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"no adapter named 'nope'; loaded adapters: \['default', 'second'\]"):
        tuned(input_ids=ids, adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 2 rows"):
        tuned(input_ids=ids, adapter_names=["default", "second", "default"])


def test_merged_adapters_refuse_rows_and_virtual_tokens_refuse_base_rows():
    tuned = _lm_case("lora", {"r": 4})
    ids = torch.ones(2, 3, dtype=torch.long)
    tuned.merge_adapter()
    with pytest.raises(ConfigError, match="unmerge_adapter"):
        tuned(input_ids=ids, adapter_names=["default", "second"])
    prompt = _lm_case("prompt_tuning", {"num_virtual_tokens": 3})
    with pytest.raises(ConfigError, match="cannot share a batch"):
        prompt(input_ids=ids, adapter_names=["default", "__base__"])


def test_beam_search_expands_each_rows_adapter():
    tuned = _lm_case("lora", {"r": 4, "lora_alpha": 8})
    with torch.no_grad():
        tuned.get_base_model().lm_head.weight.mul_(30)
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = tuned.generate(input_ids=ids, adapter_names=["second", "default"], **kwargs)
        tuned.set_adapter("second")
        second = tuned.generate(input_ids=ids, **kwargs)
        tuned.set_adapter("default")
        default = tuned.generate(input_ids=ids, **kwargs)
    assert not torch.equal(second, default)
    assert torch.equal(mixed[0], second[0]) and torch.equal(mixed[1], default[1])

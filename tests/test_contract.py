"""The tuner contract over every registered tuner x example config x compatible tiny model."""

import pytest

from deltatune import all_specs
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS

CASES = []
for spec in all_specs():
    for index, example in enumerate(spec.example_configs):
        for tiny in TINY_MODELS.values():
            if spec.contract_models and tiny.name not in spec.contract_models:
                continue
            if contract.make_config(spec, example, tiny) is not None:
                CASES.append(pytest.param(spec, example, tiny, id=f"{spec.name}{index}-{tiny.name}"))


@pytest.mark.parametrize("check", list(contract.CHECKS))
@pytest.mark.parametrize(("spec", "example", "tiny"), CASES)
def test_contract(spec, example, tiny, check):
    config = contract.make_config(spec, example, tiny)
    contract.CHECKS[check](tiny, config)


def test_every_tuner_runs_on_several_models():
    """A tuner whose examples stop building (ConfigError) would silently leave the matrix: guard it."""
    covered: dict[str, set[str]] = {}
    for case in CASES:
        spec, _, tiny = case.values
        covered.setdefault(spec.name, set()).add(tiny.name)
    for spec in all_specs():
        assert covered.get(spec.name), f"{spec.name} runs on no tiny model: its examples no longer build"
    pairs = sum(len(models) for models in covered.values())
    assert pairs >= 76, f"only {pairs} tuner x model pairs in the matrix (76 when this guard was written)"

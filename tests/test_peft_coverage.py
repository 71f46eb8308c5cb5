"""Every method type the installed peft defines is either implemented here (a registered tuner reads and
writes its files) or listed below with the reason it is not. A new peft release adding a type, or a
tuner landing without this list being updated, fails this test."""

import pytest

from deltatune import all_specs

peft = pytest.importorskip("peft")

TODO = "not implemented yet (issue 17: every peft tuner)"
LORA_FAMILY = "belongs to the LoRA-family work (AdaLoRA, trainable tokens), not implemented yet"

NOT_IMPLEMENTED = {
    "ADALORA": LORA_FAMILY,
    "TRAINABLE_TOKENS": LORA_FAMILY,
    "VERA": TODO,
    "VBLORA": TODO,
    "RANDLORA": TODO,
    "SHIRA": TODO,
    "C3A": TODO,
    "ROAD": TODO,
    "DELORA": TODO,
    "WAVEFT": TODO,
    "GRALORA": TODO,
    "XLORA": TODO,
    "POLY": TODO,
    "MULTITASK_PROMPT_TUNING": TODO,
    "ADAPTION_PROMPT": TODO,
    "CPT": TODO,
    "ADAMSS": TODO,
    "BEFT": TODO,
    "LILY": TODO,
    "FROD": TODO,
    "PVERA": TODO,
    "GLORA": TODO,
    "UNILORA": TODO,
    "HIRA": TODO,
    "OSF": TODO,
    "CARTRIDGE": TODO,
    "TINYLORA": TODO,
    "PSOFT": TODO,
    "PEANUT": TODO,
    "SHADOW": TODO,
    "SUPERTUNING": TODO,
    "DEFT": TODO,
}


def _implemented() -> set[str]:
    return {spec.peft_type for spec in all_specs()}


def test_every_peft_type_is_implemented_or_excluded_with_a_reason():
    peft_types = {t.value for t in peft.PeftType}
    missing = sorted(peft_types - _implemented() - set(NOT_IMPLEMENTED))
    assert not missing, f"peft {peft.__version__} types neither implemented nor excluded: {missing}"
    assert all(reason.strip() for reason in NOT_IMPLEMENTED.values())


def test_exclusion_list_holds_nothing_implemented_or_unknown():
    peft_types = {t.value for t in peft.PeftType}
    done = sorted(_implemented() & set(NOT_IMPLEMENTED))
    assert not done, f"implemented now, drop them from NOT_IMPLEMENTED: {done}"
    stale = sorted(set(NOT_IMPLEMENTED) - peft_types)
    assert not stale, f"not peft {peft.__version__} types: {stale}"

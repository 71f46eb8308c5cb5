"""Every method type the installed peft defines is either implemented here (a registered tuner reads and
writes its files) or listed below with the reason it is not. A new peft release adding a type, or a
tuner landing without this list being updated, fails this test."""

import dataclasses

import pytest

from deltatune import all_specs

peft = pytest.importorskip("peft")

TODO = "not implemented yet (issue 17)"
LORA_FAMILY = "not implemented yet: belongs to the LoRA-family work (AdaLoRA, trainable tokens)"

NOT_IMPLEMENTED = {
    "ADALORA": LORA_FAMILY,
    # mixture and multi-task methods: they route between several adapters or tasks per input
    "XLORA": TODO + ": a learned classifier mixes several loaded LoRAs per token (two forward passes)",
    "POLY": TODO + ": routes an inventory of LoRA skills by task ids given to every forward",
    "MULTITASK_PROMPT_TUNING": TODO + ": a shared prompt times per-task low-rank factors, chosen by task ids",
    "ADAPTION_PROMPT": TODO + ": LLaMA-Adapter replaces attention modules with gated adaption-prompt ones",
    "CPT": TODO + ": context-aware prompt tuning needs token-type masks and its own loss in the training loop",
    # newer methods whose structure goes beyond a per-layer delta
    "ADAMSS": TODO + ": subspace adaptation with an importance schedule driven by a training callback",
    "LILY": TODO + ": low-rank experts shared across layers (stride_A) with data-dependent routing",
    "FROD": TODO + ": its setup pass over the base weights (sparse_rate, regularization_alpha) is not ported",
    "OSF": TODO + ": SVD split of each weight with gradient-projection hooks on the trained part",
    "TINYLORA": TODO + ": SVD factors per layer, seeded projections and trained vectors tied across layer groups",
    "PSOFT": TODO + ": an orthogonal r x r transform between SVD-initialised frozen factors",
    "SHADOW": TODO + ": a parallel shadow network riding the decoder loop (block-level, not a layer delta)",
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


# written by peft for its own bookkeeping, or never saved (LoRA's runtime_config: "not saved or restored")
BOOKKEEPING = {"peft_type", "auto_mapping", "peft_version", "task_type", "base_model_name_or_path", "revision"}
BOOKKEEPING |= {"runtime_config"}


@pytest.mark.parametrize("name", [s.name for s in all_specs() if s.peft_type in {t.value for t in peft.PeftType}])
def test_config_fields_match_peft(name):
    """What we write to adapter_config.json is a field of peft's config class, and every peft field we do
    not have is one we refuse unless neutral (so a peft file never loses meaning silently)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from deltatune import get_spec

    spec = get_spec(name)
    theirs = {f.name for f in dataclasses.fields(PEFT_TYPE_TO_CONFIG_MAPPING[spec.peft_type])}
    ours = {f.name for f in dataclasses.fields(spec.config)}
    written = ours - set(spec.config.sidecar_fields)
    assert not written - theirs, f"{spec.name}: fields peft does not know go to the sidecar: {sorted(written - theirs)}"
    unhandled = theirs - ours - set(spec.config.unsupported_peft_keys) - BOOKKEEPING
    assert not unhandled, f"{spec.name}: peft fields neither read nor refused: {sorted(unhandled)}"

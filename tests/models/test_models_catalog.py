"""The catalogue validates: unknown keys are errors, every role maps to module-name strings, and
each entry resolves to a family, role map, template and hub id."""

from __future__ import annotations

import copy
import re
from importlib import resources

import pytest
import yaml

from deltatune.models import MODELS, ROLES, TEMPLATE_NAMES, CatalogError
from deltatune.models.catalog import parse_catalog

RAW = yaml.safe_load(resources.files("deltatune.models").joinpath("catalog.yaml").read_text(encoding="utf-8"))

# every family the brief names (ms-swift 1.x users), plus the offline default
EXPECTED = [
    "smollm2-135m-instruct", "qwen-7b-chat", "qwen-14b-chat", "qwen-vl-chat", "qwen2-7b-instruct",
    "qwen2.5-7b-instruct", "qwen3-8b", "baichuan2-7b-chat", "baichuan2-13b-chat", "chatglm2-6b", "chatglm3-6b",
    "llama2-7b-chat", "llama2-13b-chat", "llama3-8b-instruct", "llama3.1-8b-instruct", "openbuddy-llama2-13b-chat",
    "internlm-chat-7b", "internlm2-chat-7b", "internlm2-chat-20b", "polylm-13b", "seqgpt-560m", "mistral-7b-instruct",
]  # fmt: skip


def _broken(edit) -> dict:
    raw = copy.deepcopy(RAW)
    edit(raw)
    return raw


def test_catalogue_has_every_family_and_valid_entries():
    assert set(EXPECTED) <= set(MODELS)
    for spec in MODELS.values():
        assert spec.hf_id or spec.ms_id or spec.asset, spec.name
        assert spec.chat_template in TEMPLATE_NAMES
        assert set(spec.roles) == set(ROLES)
        assert all(isinstance(n, str) and n for names in spec.roles.values() for n in names)
        assert spec.default_targets == spec.roles["attention_qv"]
        for hub_id in (spec.hf_id, spec.ms_id):
            assert hub_id is None or hub_id.count("/") == 1, hub_id


def test_known_facts():
    assert MODELS["smollm2-135m-instruct"].default_targets == ("q_proj", "v_proj")
    assert MODELS["smollm2-135m-instruct"].asset is not None
    assert MODELS["chatglm3-6b"].default_targets == ("query_key_value",)
    assert MODELS["baichuan2-7b-chat"].default_targets == ("W_pack",)
    assert MODELS["qwen-7b-chat"].default_targets == ("c_attn",)
    assert MODELS["internlm2-chat-7b"].default_targets == ("wqkv",)
    assert MODELS["qwen-vl-chat"].task == "vision-language"
    remote = {name for name, spec in MODELS.items() if spec.requires_remote_code}
    assert {"qwen-7b-chat", "qwen-vl-chat", "baichuan2-7b-chat", "chatglm2-6b", "chatglm3-6b", "internlm-chat-7b",
            "internlm2-chat-20b"} <= remote  # fmt: skip
    assert not remote & {"qwen2.5-7b-instruct", "qwen3-8b", "llama3-8b-instruct", "mistral-7b-instruct"}
    ia3 = MODELS["llama2-7b-chat"].targets_for("ia3")
    assert ia3 == {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    assert MODELS["llama2-7b-chat"].targets_for("prompt_tuning") == {}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["models"]["qwen3-8b"].update(hf_repo="x/y"), "unknown keys ['hf_repo']"),
        (lambda r: r["families"]["qwen2"].update(lora_targets=["q"]), "unknown keys ['lora_targets']"),
        (lambda r: r.update(extras={}), "unknown sections ['extras']"),
        (lambda r: r["role_maps"]["llama"].update(attention_q=["q_proj"]), "unknown roles ['attention_q']"),
        (lambda r: r["role_maps"]["llama"].pop("mlp"), "missing roles ['mlp']"),
        (lambda r: r["role_maps"]["llama"].update(mlp=["gate_proj", 3]), "every target must be a non-empty string"),
        (lambda r: r["role_maps"]["llama"].update(mlp="gate_proj"), "must be a non-empty list"),
        (lambda r: r["role_maps"]["llama"].update(mlp=[" up_proj"]), "every target must be a non-empty string"),
        (lambda r: r["tuners"]["lora"].update(target_modules=["queries"]), "unknown role 'queries'"),
        (lambda r: r["models"]["qwen3-8b"].update(family="qwen9"), "unknown family 'qwen9'"),
        (lambda r: r["models"]["qwen3-8b"].update(chat_template="vicuna"), "unknown chat_template 'vicuna'"),
        (lambda r: r["models"]["qwen3-8b"].update(task="audio"), "task must be one of"),
        (lambda r: r["models"]["qwen3-8b"].update(requires_remote_code="no"), "requires_remote_code must be bool"),
        (lambda r: r["models"]["qwen3-8b"].update(hf_id=None, ms_id=None), "needs hf_id, ms_id or an asset"),
        (lambda r: r["models"]["qwen3-8b"].update(asset="os.system"), "unknown asset 'os.system'"),
        (lambda r: r["models"].update({"Bad Name": {"family": "qwen2", "hf_id": "a/b"}}), "names are lowercase"),
        (lambda r: r["families"]["qwen2"].pop("architecture"), "missing keys ['architecture']"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_catalogue_is_refused(edit, message):
    with pytest.raises(CatalogError, match=re.escape(message)):
        parse_catalog(_broken(edit))


def test_yaml_is_data_only():
    text = "role_maps: !!python/object/apply:os.system ['true']\n"
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(text)

"""Config values that must be refused before anything is allocated or matched for long: non-finite
numbers, ranks beyond the layer, adapters that cannot fit in memory, catastrophic regexes; and a
UTF-8 BOM in adapter_config.json, which JSON readers commonly accept."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core import matching
from deltatune.core.config import ConfigError
from deltatune.io.peft_format import read_config


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 8)

    def forward(self, x):
        return self.v_proj(self.q_proj(x))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError, match="lora_alpha"):
        dt.LoraConfig(r=2, lora_alpha=value, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="alpha_pattern"):
        dt.LoraConfig(r=2, alpha_pattern={"q_proj": value}, target_modules=["q_proj"])


@pytest.mark.parametrize("text", ["NaN", "Infinity"])
def test_non_finite_alpha_in_a_file_is_refused(tmp_path, text):
    (tmp_path / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "lora_alpha": ' + text + ', "target_modules": ["q_proj"]}'
    )
    with pytest.raises(ConfigError, match="lora_alpha"):
        read_config(tmp_path)


def test_rank_beyond_the_layer_is_refused_before_allocating():
    model = Tiny()
    with pytest.raises(ConfigError, match=r"r=1000000000 .*q_proj"):
        dt.get_tuned_model(model, dt.LoraConfig(r=10**9, target_modules=["q_proj"]))
    assert isinstance(model.q_proj, nn.Linear)  # the model is untouched


def test_adapter_that_cannot_fit_in_memory_is_refused(monkeypatch):
    from deltatune.core import limits

    monkeypatch.setattr(limits, "available_bytes", lambda: 1000)
    with pytest.raises(ConfigError, match=r"needs .* memory"):
        dt.get_tuned_model(Tiny(), dt.LoraConfig(r=16, target_modules=["q_proj"]))


def test_catastrophic_regex_is_bounded_and_named(monkeypatch):
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(30) for p in ("q_proj", "k_proj", "v_proj")]
    config = dt.LoraConfig(target_modules="(.*.*)*zzz")
    started = time.time()
    assert matching.find_targets(names, config).targets == []  # the pattern: fast, no match
    assert time.time() - started < 5
    monkeypatch.setattr(matching, "MATCH_TIMEOUT_S", 1e-9)  # any pattern that exceeds the limit
    with pytest.raises(ConfigError, match=r"target_modules='\(\.\*\.\*\)\*zzz' took more than"):
        matching.find_targets(names, config)


def test_bom_in_adapter_config_is_accepted(tmp_path):
    import copy

    base = Tiny()
    fresh = copy.deepcopy(base)
    config = dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="gaussian")
    tuned = dt.get_tuned_model(base, config)
    tuned.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_config(tmp_path).r == 2
    loaded = dt.TunedModel.from_pretrained(fresh, tmp_path)
    assert isinstance(loaded, dt.TunedModel)
    x = torch.randn(2, 16)
    assert torch.allclose(loaded(x), tuned(x))
    json.loads(path.read_text(encoding="utf-8-sig"))

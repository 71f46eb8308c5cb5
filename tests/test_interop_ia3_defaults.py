"""A default peft IA3 adapter loads with identical outputs.

peft's `IA3Config(target_modules=["q_proj", "v_proj"])` on a Llama saves
`feedforward_modules=["down_proj"]`, filled from peft's per-architecture defaults although
down_proj is not targeted; the entry selects no target, so it changes nothing, and the file must load.
"""

import json
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS

peft = pytest.importorskip("peft")


def test_default_peft_ia3_adapter_loads_with_identical_outputs(tmp_path):
    tiny = TINY_MODELS["llama"]
    base_out = contract.run(tiny, tiny.fresh())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny.fresh(), peft.IA3Config(target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    expected = contract.run(tiny, theirs.eval())
    assert (expected - base_out).abs().max() > 1e-4
    theirs.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["feedforward_modules"] == ["down_proj"] and sorted(saved["target_modules"]) == ["q_proj", "v_proj"]

    ours = dt.TunedModel.from_pretrained(tiny.fresh(), tmp_path).eval()
    torch.testing.assert_close(contract.run(tiny, ours), expected, atol=1e-6, rtol=0)
    assert ours.peft_config["default"].feedforward_modules == []


def test_a_feedforward_typo_in_code_is_still_refused():
    with pytest.raises(dt.ConfigError, match="subset of target_modules"):
        dt.IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=["down_prj"])

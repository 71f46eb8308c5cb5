"""Adapter and base identity: the sidecar records a base fingerprint, the chat template's hash and
the weights' sha256; loading onto another base or with another template warns, a corrupted file is
an error, and an adapter that cannot change the model (all-zero B) warns that it is untrained."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from train_helpers import CHATML, build_model, build_tokenizer

import deltatune as dt
from deltatune.cli.main import main
from deltatune.io import AdapterFileError
from deltatune.io.provenance import template_sha256


def _base(seed: int = 0):
    return build_model(len(build_tokenizer()), seed=seed)


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    tuned = dt.get_tuned_model(_base(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("trained") / "adapter"
    tuned.save_pretrained(folder)
    return folder


def _load(folder, base):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dt.TunedModel.from_pretrained(base, folder)
    return [str(w.message) for w in record]


def test_sidecar_records_fingerprint_and_sha256(trained_adapter):
    sidecar = json.loads((trained_adapter / "deltatune_config.json").read_text())
    assert set(sidecar["base_fingerprint"]["tensors"]) == {"input_embeddings", "output_embeddings"}
    assert len(sidecar["sha256"]["adapter_model.safetensors"]) == 64
    config = json.loads((trained_adapter / "adapter_config.json").read_text())
    assert "base_fingerprint" not in config and "sha256" not in config  # peft sees only its own fields


def test_another_base_of_the_same_shapes_warns(trained_adapter):
    assert not [m for m in _load(trained_adapter, _base(seed=0)) if "another base" in m]
    messages = _load(trained_adapter, _base(seed=1))
    assert [m for m in messages if "trained on another base model" in m and "embeddings" in m]


def test_bf16_copy_of_the_same_base_does_not_warn(trained_adapter):
    assert not [m for m in _load(trained_adapter, _base(seed=0).to(torch.bfloat16)) if "another base" in m]


def test_flipped_bit_is_an_error(trained_adapter, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(trained_adapter, folder)
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # a bit in the last tensor's values: still a readable, finite file
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="does not match the sha256"):
        dt.TunedModel.from_pretrained(_base(), folder)


def test_untrained_adapter_warns(trained_adapter, tmp_path):
    fresh = dt.get_tuned_model(_base(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    fresh.save_pretrained(tmp_path / "fresh")
    assert [m for m in _load(tmp_path / "fresh", _base()) if "is untrained: all its B matrices are zero" in m]
    assert not [m for m in _load(trained_adapter, _base()) if "untrained" in m]


def test_training_records_the_template_and_infer_compares_it(tiny_assets, tmp_path):
    model_dir, data = tiny_assets
    out = tmp_path / "run"
    flags = ["sft", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out), "--batch-size", "4",
             "--max-length", "32", "--val-size", "8", "--num-samples", "0", "--max-steps", "2", "--save-steps", "2",
             "--tuner-args", "r=2,target_modules=[q_proj]"]  # fmt: skip
    assert main(flags) == 0
    sidecar = json.loads((out / "adapter" / "deltatune_config.json").read_text())
    assert sidecar["chat_template_sha256"] == template_sha256(CHATML)

    other = tmp_path / "other-template"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML.replace("<|im_start|>", "<|im_start|> ")
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in other.glob("chat_template.j*"):
        extra.write_text(config["chat_template"])
    infer = ["infer", "--adapter", str(out / "adapter"), "--prompt", "hi", "--max-new-tokens", "1"]
    for model, expect in ((model_dir, False), (other, True)):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert main([*infer, "--model", str(model)]) == 0
        assert any("another chat template" in str(w.message) for w in record) is expect

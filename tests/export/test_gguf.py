"""GGUF export round trips: write with deltatune, read back with gguf's reader and with transformers'
GGUF loader, compare logits with the merged transformers model and tokenization with the original."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from export_helpers import SAMPLE, byte_level_tokenizer, sentencepiece_tokenizer, tiny_model  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.export import ExportError, write_gguf  # noqa: E402
from deltatune.export.gguf_arch import llama_permute  # noqa: E402

# Max |logit difference| allowed after a round trip, per tensor type (logits here are O(1)):
# f32 is exact; f16 / bf16 / q8_0 are rounding of the weights (q8_0: 8-bit blocks of 32 values).
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 2e-2, "q8_0": 3e-2}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _merged_with_lora(arch: str, tokenizer, *, tied: bool = False):
    """A tiny model with a LoRA on every linear layer, B randomized so the adapter changes the output, merged."""
    base = tiny_model(arch, len(tokenizer) + 6, tied=tied)
    ids = tokenizer(SAMPLE, return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits.clone()
    tuned = dt.get_tuned_model(base, dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    merged = tuned.merge_and_unload()
    with torch.no_grad():
        after = merged(ids).logits
    assert (after - before).abs().max() > 1e-2, "the adapter must change the output (non-vacuous round trip)"
    return merged, ids


def _load_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


@pytest.mark.parametrize(
    "arch, tied, gguf_type",
    [("llama", True, "f32"), ("llama", False, "q8_0"), ("qwen2", False, "f16"), ("qwen2", True, "q8_0"),
     ("qwen3", True, "bf16"), ("qwen3", False, "f32"), ("mistral", False, "f16")],
)  # fmt: skip
def test_round_trip_logits_match(tmp_path, arch, tied, gguf_type):
    tokenizer = byte_level_tokenizer("qwen2" if arch.startswith("qwen") else "gpt-2")
    merged, ids = _merged_with_lora(arch, tokenizer, tied=tied)
    report = write_gguf(merged, tokenizer, tmp_path / "m.gguf", gguf_type=gguf_type)
    loaded, _ = _load_gguf(report.path)
    with torch.no_grad():
        want, got = merged(ids).logits, loaded(ids).logits
    diff = (want - got).abs().max().item()
    assert diff <= TOLERANCE[gguf_type], f"{arch} {gguf_type}: max logit diff {diff}"
    assert loaded.config.tie_word_embeddings == tied
    names = {t.name for t in gguf.GGUFReader(report.path).tensors}
    assert ("output.weight" in names) == (not tied)  # tied: llama.cpp reuses token_embd


def test_tensor_names_types_and_llama_qk_order(tmp_path):
    tokenizer = byte_level_tokenizer()
    model = tiny_model("llama", len(tokenizer))
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", gguf_type="q8_0").path
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight",
            "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"} <= set(tensors)  # fmt: skip
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # 1-D stays f32
    # q/k rows are in llama.cpp's rotary order: undoing the permutation gives the transformers weight back
    for hf, name, heads in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2)):
        stored = torch.from_numpy(
            gguf.dequantize(tensors[f"blk.0.{name}.weight"].data, tensors[f"blk.0.{name}.weight"].tensor_type).copy()
        )
        want = getattr(model.model.layers[0].self_attn, hf).weight.detach()
        assert torch.allclose(stored, llama_permute(want, heads), atol=2e-2)
        assert not torch.allclose(stored, want, atol=2e-2)  # the permutation is not the identity here
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["llama.rope.dimension_count"].contents() == 16
    assert fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)


@pytest.mark.parametrize("kind, pre", [("gpt-2", "gpt-2"), ("qwen2", "qwen2"), ("smollm", "smollm")])
def test_byte_level_tokenizer_metadata(tmp_path, kind, pre):
    tokenizer = byte_level_tokenizer(kind)
    path = write_gguf(tiny_model("llama", len(tokenizer) + 3), tokenizer, tmp_path / "m.gguf", gguf_type="f32").path
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == pre
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(tokenizer) + 3 and tokens[-1] == f"[PAD{len(tokenizer) + 2}]"
    assert types[tokenizer.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert len(fields["tokenizer.ggml.merges"].contents()) > 0


@pytest.mark.parametrize(
    "maker", [lambda: byte_level_tokenizer("gpt-2"), lambda: byte_level_tokenizer("qwen2"), sentencepiece_tokenizer]
)
def test_tokenizer_encodes_identically_after_round_trip(tmp_path, maker):
    tokenizer = maker()
    model = tiny_model("llama", len(tokenizer))
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", gguf_type="f16").path
    _, loaded = _load_gguf(path)
    texts = [SAMPLE, "add seven and two please", "zero plus one is 1!!"]
    if not tokenizer.bos_token:  # sentencepiece: transformers' GGUF reader prepends "▁" with Metaspace, which
        texts.append(" leading space")  # differs from the original's normalizer on text that starts with a space
    for text in texts:
        assert loaded(text).input_ids == tokenizer(text).input_ids, text
    chat = [{"role": "user", "content": "add one and two"}]
    assert loaded.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(chat, tokenize=False)


def test_sentencepiece_metadata(tmp_path):
    tokenizer = sentencepiece_tokenizer()
    path = write_gguf(tiny_model("mistral", len(tokenizer)), tokenizer, tmp_path / "m.gguf", gguf_type="f32").path
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[tokenizer.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    scores = np.array(fields["tokenizer.ggml.scores"].contents())
    assert (scores < 0).any()  # merged tokens ranked by merge order


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = byte_level_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ExportError, match=r"model type 'gpt2'; supported: llama, mistral, qwen2, qwen3"):
        write_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_rope_scaling_is_refused(tmp_path):
    tokenizer = byte_level_tokenizer()
    model = tiny_model("llama", len(tokenizer))
    model.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    with pytest.raises(ExportError, match="rope scaling 'llama3'"):
        write_gguf(model, tokenizer, tmp_path / "m.gguf")


def test_llama_cpp_greedy_tokens_match(tmp_path):
    llama_cpp = pytest.importorskip(
        "llama_cpp",
        reason="llama-cpp-python has no binary wheel for this platform on PyPI (`pip install llama-cpp-python "
        "--only-binary :all:` finds none) and tests do not compile it",
    )
    tokenizer = byte_level_tokenizer()
    merged, ids = _merged_with_lora("llama", tokenizer)
    path = write_gguf(merged, tokenizer, tmp_path / "m.gguf", gguf_type="f32").path
    with torch.no_grad():
        want = merged.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
    got = []
    for token in llm.generate(ids[0].tolist(), temp=0.0, top_k=1):
        got.append(token)
        if len(got) == 8:
            break
    assert got == want


def test_unmerged_model_is_refused(tmp_path):
    tokenizer = byte_level_tokenizer()
    tuned = dt.get_tuned_model(tiny_model("llama", len(tokenizer)), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ExportError, match="merge_and_unload"):
        write_gguf(tuned, tokenizer, tmp_path / "m.gguf")

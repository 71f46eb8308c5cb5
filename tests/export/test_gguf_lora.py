"""llama.cpp LoRA GGUF: layout (metadata, names, shapes llama.cpp checks) and the numbers: the update
llama.cpp computes from the file, (alpha / r) * B A with q/k rows in its rotary order, equals the
update deltatune merges."""

from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")

from export_helpers import tiny_model  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.export import ExportError, write_lora_gguf  # noqa: E402
from deltatune.export.gguf_arch import llama_permute  # noqa: E402

VOCAB = 96


def _tuned(arch: str, config):
    tuned = dt.get_tuned_model(tiny_model(arch, VOCAB), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    return tuned


def _llama_cpp_delta(reader, name: str) -> torch.Tensor:
    """What llama.cpp adds to `name`'s output per input: (alpha / r) * B A (in its row order)."""
    tensors = {t.name: t for t in reader.tensors}
    a = torch.from_numpy(gguf.dequantize(tensors[name + ".lora_a"].data, tensors[name + ".lora_a"].tensor_type).copy())
    b = torch.from_numpy(gguf.dequantize(tensors[name + ".lora_b"].data, tensors[name + ".lora_b"].tensor_type).copy())
    alpha = reader.fields["adapter.lora.alpha"].contents()
    return (alpha / a.shape[0]) * (b @ a)  # (out, in)


@pytest.mark.parametrize(
    "arch, config",
    [
        ("llama", dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])),
        ("llama", dt.LoraConfig(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"k_proj": 2}, target_modules=["q_proj", "k_proj"])),
        ("qwen2", dt.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")),
    ],
)  # fmt: skip
def test_lora_gguf_layout_and_update(tmp_path, arch, config):
    tuned = _tuned(arch, config)
    path = write_lora_gguf(tuned, tmp_path / "adapter.gguf", gguf_type="f32")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == ("llama" if arch == "llama" else "qwen2")
    tensors = {t.name: t for t in reader.tensors}
    # llama-adapter.cpp's checks: model ne = [in, out]; a ne = [in, r], b ne = [r, out]
    for name in {n.rsplit(".", 1)[0] for n in tensors}:
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        assert a.shape[1] == b.shape[0], name  # r
    layers = {path: wrapper for path, wrapper in dt_delta_wrappers(tuned)}
    mapping = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
    assert len(tensors) == 2 * len(layers)
    for module_path, wrapper in layers.items():
        block, leaf = int(module_path.split(".")[2]), module_path.rsplit(".", 1)[1]
        name = f"blk.{block}.{mapping[leaf]}.weight"
        in_features = wrapper.deltas["default"].lora_A.weight.shape[1]
        assert tensors[name + ".lora_a"].shape[0] == in_features
        want = wrapper.deltas["default"].delta_weight()  # what deltatune merges: scale * B A
        assert want.abs().max() > 1e-3  # non-vacuous
        if arch == "llama" and leaf in ("q_proj", "k_proj"):
            want = llama_permute(want, 4 if leaf == "q_proj" else 2)
        assert torch.allclose(_llama_cpp_delta(reader, name), want, atol=1e-5), name


def dt_delta_wrappers(tuned):
    from deltatune.core.inject import delta_wrappers

    return delta_wrappers(tuned.model)


@pytest.mark.parametrize(
    "config, match",
    [
        (dt.LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]), "DoRA"),
        (dt.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), "needs a LoRA adapter"),
        (dt.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "also trains"),
        (dt.LoraConfig(r=4, target_modules=["embed_tokens"]), "linear layers only"),
    ],
)  # fmt: skip
def test_lora_gguf_refuses_what_llama_cpp_cannot_hold(tmp_path, config, match):
    tuned = dt.get_tuned_model(tiny_model("llama", VOCAB), config)
    with pytest.raises(ExportError, match=match):
        write_lora_gguf(tuned, tmp_path / "adapter.gguf")
    assert not list(tmp_path.iterdir())

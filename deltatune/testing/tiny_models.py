"""Tiny models built from config (random weights, seeded) for tests and examples.

Each `TinyModel` knows how to build itself deterministically, make inputs, read the output
tensor to compare, and which module names to target per layer kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class TinyModel:
    name: str
    build: Callable[[], nn.Module]
    make_inputs: Callable[[int], dict[str, Any]]
    targets: dict[str, list[str]]
    """Module names to target, per layer kind ("linear", "embedding", "conv")."""
    task_type: str | None = None
    output: Callable[[Any], torch.Tensor] = field(default=lambda out: out.logits)

    def fresh(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()


class ToyMLP(nn.Module):
    def __init__(self, dim: int = 12, hidden: int = 20, classes: int = 3):
        super().__init__()
        self.lin0 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.lin1(self.act(self.lin0(x)))))


class ToyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.conv1d = nn.Conv1d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (B, 8, H/2, W/2)
        h = self.conv1d(h.flatten(2))  # (B, 6, HW/4)
        return self.head(h.mean(-1))


class ToyEmbedding(nn.Module):
    def __init__(self, vocab: int = 30, dim: int = 10):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.proj = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.emb(input_ids))


def _ids(vocab: int, seed: int, shape=(2, 7)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, shape, generator=gen)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg)


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(cfg)


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5ForConditionalGeneration(cfg)


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3,
    )  # fmt: skip
    return ViTForImageClassification(cfg)


def _swin() -> nn.Module:
    from transformers import SwinConfig, SwinForImageClassification

    cfg = SwinConfig(
        image_size=16, patch_size=2, num_channels=3, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2,
        mlp_ratio=2.0, num_labels=3,
    )  # fmt: skip
    return SwinForImageClassification(cfg)


def _pixels(seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}


def _lm_inputs(seed: int) -> dict[str, Any]:
    ids = _ids(64, seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _t5_inputs(seed: int) -> dict[str, Any]:
    ids = _ids(64, seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": _ids(64, seed + 1, (2, 4))}


def _images(seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(2, 3, 8, 8, generator=gen)}


def _features(seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(4, 12, generator=gen)}


def _tensor(out: Any) -> torch.Tensor:
    return out


TINY_MODELS: dict[str, TinyModel] = {
    m.name: m
    for m in [
        TinyModel("mlp", ToyMLP, _features, {"linear": ["lin0", "lin1"]}, output=_tensor),
        TinyModel("conv", ToyConv, _images, {"conv": ["conv1", "conv2", "conv1d"], "linear": ["head"]}, output=_tensor),
        TinyModel(
            "embedding", ToyEmbedding, lambda s: {"input_ids": _ids(30, s)}, {"embedding": ["emb"], "linear": ["proj"]},
            output=_tensor,
        ),
        TinyModel("llama", _llama, _lm_inputs, {"linear": ["q_proj", "v_proj", "down_proj"], "embedding": ["embed_tokens"]}, "CAUSAL_LM"),
        TinyModel("gpt2", _gpt2, _lm_inputs, {"linear": ["c_attn", "c_fc"]}, "CAUSAL_LM"),
        TinyModel("bert", _bert, _lm_inputs, {"linear": ["query", "value"]}, "SEQ_CLS"),
        TinyModel("t5", _t5, _t5_inputs, {"linear": ["q", "v", "wo"]}, "SEQ_2_SEQ_LM"),
        TinyModel("vit", _vit, _pixels, {"linear": ["q_proj", "v_proj"], "conv": ["projection"]}),
        TinyModel("swin", _swin, _pixels, {"linear": ["q_proj", "v_proj"], "conv": ["projection"]}),
    ]
}  # fmt: skip


def build_tiny(name: str, seed: int = 0) -> nn.Module:
    """A tiny model by name (see TINY_MODELS), in eval mode."""
    return TINY_MODELS[name].fresh(seed)

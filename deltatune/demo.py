"""A short tour of the library on a tiny model: `python -m deltatune.demo`.

About 7 s of CPU time, most of it importing torch and transformers; on idle cores the wall time
is about the same, on a busy machine it grows with the load. It prints its own timings.

Builds a tiny Llama from config (random weights, no download), teaches a LoRA adapter to
continue a fixed token pattern, and shows the invariants: the adapter starts as an exact no-op,
only a few percent of the parameters train, save -> load reproduces the outputs, merge folds it in.
"""

from __future__ import annotations

import resource
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM  # at the top: the import is most of the wall time

import deltatune as dt


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def main() -> None:
    tour_started, tour_cpu = time.perf_counter(), _cpu_seconds()
    model = build_model()
    ids = torch.arange(1, 33).remainder(13).add(3).repeat(4, 1)  # (4, 32): a repeating pattern to learn
    with torch.no_grad():
        base_loss = model(input_ids=ids, labels=ids).loss.item()

    config = dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    tuned = dt.get_tuned_model(model, config)
    tuned.print_trainable_parameters()
    with torch.no_grad():
        assert tuned(input_ids=ids, labels=ids).loss.item() == base_loss, "LoRA at init must be a no-op"

    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    start = time.perf_counter()
    tuned.train()
    for step in range(60):
        loss = tuned(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    tuned.eval()
    with torch.no_grad():
        tuned_loss = tuned(input_ids=ids, labels=ids).loss.item()
    print(f"loss before {base_loss:.3f} -> after {tuned_loss:.3f} ({time.perf_counter() - start:.1f} s of training)")

    with tempfile.TemporaryDirectory() as folder:
        tuned.save_pretrained(folder)
        reloaded = dt.TunedModel.from_pretrained(build_model(), folder)
        with torch.no_grad():
            same = torch.allclose(reloaded(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-6)
        print(f"saved to a peft-format folder and reloaded: identical logits = {same}")
    merged = tuned.merge_and_unload()
    with torch.no_grad():
        print(f"merged into a plain {type(merged).__name__}: loss {merged(input_ids=ids, labels=ids).loss.item():.3f}")
    print(f"tour: {time.perf_counter() - tour_started:.1f} s wall, {_cpu_seconds() - tour_cpu:.1f} s CPU; the whole process: "
          f"{_cpu_seconds():.1f} s CPU, the rest of it importing torch and transformers")  # fmt: skip


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()

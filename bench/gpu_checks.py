"""CUDA checks in one short run (`PYTHONPATH=. python bench/gpu_checks.py`): bf16 numerics of the
LoRA/DoRA paths against peft, merge/unmerge and save/load on the GPU. Prints one line per check."""

from __future__ import annotations

import tempfile

import torch

import deltatune as dt
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS
from deltatune.tuners.lora import _one_node as ONE_NODE


def main() -> None:
    import peft

    assert torch.cuda.is_available(), "no CUDA device"
    tiny = TINY_MODELS["llama"]
    for variant in ({"r": 4}, {"r": 4, "use_dora": True}):
        model = tiny.fresh().to("cuda", torch.bfloat16)
        tuned = dt.get_tuned_model(model, dt.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], **variant))
        contract.perturb(tuned)
        assert {p.dtype for n, p in tuned.model.named_parameters() if ".deltas." in n} == {torch.float32}
        inputs = {k: v.cuda() for k, v in tiny.make_inputs(0).items()}
        with torch.no_grad():
            ours = tuned(**inputs).logits
        with tempfile.TemporaryDirectory() as folder:
            tuned.save_pretrained(folder)
            theirs = peft.PeftModel.from_pretrained(tiny.fresh().to("cuda", torch.bfloat16), folder).eval()
            with torch.no_grad():
                ref = theirs(**inputs).logits
            reloaded = dt.TunedModel.from_pretrained(tiny.fresh().to("cuda", torch.bfloat16), folder)
            with torch.no_grad():
                again = reloaded(**inputs).logits
        tuned.merge_adapter()
        with torch.no_grad():
            merged = tuned(**inputs).logits
        tuned.unmerge_adapter()
        logits = tuned(**inputs).logits
        logits.float().pow(2).mean().backward()
        grads = [p.grad for p in tuned.parameters() if p.requires_grad]
        print(
            f"{variant}: dtype {ours.dtype}; |ours - peft| {(ours - ref).abs().max().item():.4f} (peft computes the "
            f"adapter in fp32); reload exact {torch.equal(ours, again)}; |merged - unmerged| "
            f"{(merged - ours).abs().max().item():.4f}; grads finite {all(torch.isfinite(g).all().item() for g in grads)}"
        )

    one_node_check(tiny)


def one_node_check(tiny) -> None:
    """LoRA training through the one-node op and through separate ops: same loss and gradients (bf16)."""
    import deltatune.tuners.lora as lora

    tuned = dt.get_tuned_model(tiny.fresh().to("cuda", torch.bfloat16), dt.LoraConfig(target_modules="all-linear", r=4))
    contract.perturb(tuned)
    inputs = {k: v.cuda() for k, v in tiny.make_inputs(0).items()}
    results = []
    for one_node in (True, False):
        lora._one_node = (lambda *args: False) if not one_node else ONE_NODE
        loss = tuned(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.float() for n, p in tuned.named_parameters() if p.requires_grad}))
        tuned.zero_grad(set_to_none=True)
    lora._one_node = ONE_NODE
    (loss_a, grads_a), (loss_b, grads_b) = results
    worst = max(((grads_a[n] - grads_b[n]).abs().max() / grads_b[n].abs().max().clamp_min(1e-12)).item() for n in grads_a)
    print(f"one-node LoRA (bf16, cuda): |loss diff| {(loss_a - loss_b).abs().item():.5f}; worst relative grad diff {worst:.4f}")


if __name__ == "__main__":
    main()

"""Peak tensor memory of one training step (forward, backward, AdamW step): full fine-tuning vs
LoRA, on a ViT-Tiny-sized classifier and a small text-conditioned UNet, same batch for both.

CPU has no allocator statistics, so a TorchDispatchMode tracks every tensor storage created
during the step (activations, gradients, optimizer state) until it is freed; parameters that
existed before the step are not counted (reported separately). Random weights: memory does not
depend on their values.

    python examples/vision_memory.py
"""

from __future__ import annotations

import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import deltatune as dt

MiB = 2**20


class PeakTensorMemory(TorchDispatchMode):
    """Bytes of tensor storage allocated inside the block and still alive: current and peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an input's storage: not a new allocation
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key in inputs or key in self.live or storage.nbytes() == 0:
                    continue
                self.live[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def vit_small():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                       intermediate_size=768, num_labels=10)  # fmt: skip
    model = ViTForImageClassification(config)
    batch = {"pixel_values": torch.randn(8, 3, 224, 224), "labels": torch.randint(0, 10, (8,))}
    lora = dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    return model, batch, lora, lambda m, b: m(**b).loss


def unet_small():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, norm_num_groups=8, attention_head_dim=8,
    )  # fmt: skip
    batch = {"sample": torch.randn(8, 4, 32, 32), "timestep": torch.randint(0, 1000, (8,)),
             "encoder_hidden_states": torch.randn(8, 16, 64)}  # fmt: skip
    lora = dt.LoraConfig(r=8, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    return model, batch, lora, lambda m, b: m(**b).sample.pow(2).mean()


def measure(build, method: str) -> dict:
    torch.manual_seed(0)
    model, batch, lora, loss_fn = build()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if method == "lora":
        model = dt.get_tuned_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    start = time.perf_counter()
    with PeakTensorMemory() as tracker:
        loss_fn(model, batch).backward()
        optimizer.step()
    return {
        "params_MiB": params / MiB,
        "trainable": sum(p.numel() for p in trainable),
        "peak_MiB": tracker.peak / MiB,
        "step_s": time.perf_counter() - start,
    }


def main() -> None:
    torch.set_num_threads(2)
    print("| model | method | parameters (MiB) | trainable | peak step memory (MiB) | step time (s) |")
    print("|---|---|---|---|---|---|")
    for name, build in (
        ("ViT (hidden 192, 12 layers, 224 px), batch 8", vit_small),
        ("UNet (32/64 ch, 32x32 latents), batch 8", unet_small),
    ):
        for method in ("full", "lora"):
            r = measure(build, method)
            print(
                f"| {name} | {method} | {r['params_MiB']:.1f} | {r['trainable']:,} | {r['peak_MiB']:.1f} | {r['step_s']:.2f} |"
            )


if __name__ == "__main__":
    main()

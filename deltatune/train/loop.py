"""The training loop: one readable function on `accelerate`, whatever the tuner.

    result = deltatune.train.train(TrainArgs(model="smollm2-135m-instruct", dataset="chatterbot-en"))

Order of a run: validate arguments -> claim the output folder -> load, split and tokenize the data
-> load the base model, add the adapter -> restore a checkpoint (--resume) -> held-out loss and
sample answers -> steps -> held-out loss and sample answers again -> final adapter, plot.

One optimizer step reads `grad_accum` micro-batches. Its loss is token-level: the sum of every
supervised token's cross-entropy over the number of supervised tokens of the whole accumulated
batch (all micro-batches, all processes), so k micro-batches of b rows give the gradient of one
batch of k*b rows. Each micro-batch's backward gets (its token-loss sum) / (global token count),
times world_size because DDP averages gradients over processes.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from deltatune.core.config import ConfigError
from deltatune.core.tuned_model import TunedModel, get_tuned_model
from deltatune.io.provenance import template_sha256
from deltatune.tasks.base import TaskData, headline
from deltatune.tasks.registry import get_task
from deltatune.train import checkpoint as ckpt
from deltatune.train import distributed as dist
from deltatune.train.args import TrainArgs, stable_hash
from deltatune.train.data import StepData, fingerprint
from deltatune.train.errors import DivergedError, GradientCheckError, Interrupted, NothingToDo, ResumeError
from deltatune.train.faults import maybe_fault
from deltatune.train.metrics import MetricsLog, plot_losses
from deltatune.train.optim import build_optimizer, lr_factor, set_lr, trainable_parameters
from deltatune.train.outdir import RunLock, missing_outputs, prepare_output_dir, save_final_adapter
from deltatune.train.resume import apply_knobs, check_knobs
from deltatune.train.setup import build_tuner_config, config_from_args, diff, structural
from deltatune.train.trackers import TrackedLog, check_tracker


@dataclass
class TrainResult:
    """What a run produced (also printed by `deltatune sft`)."""

    output_dir: Path
    adapter_dir: Path
    steps: int
    resumed_from: int = 0
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    samples: list[dict[str, str]] = field(default_factory=list)
    plot: Path | None = None
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    is_main_process: bool = True


def _default_output_dir(args: TrainArgs) -> Path:
    short = Path(args.model).name.lower().replace("/", "-") or "model"
    return Path("runs") / f"{short}-{args.tuner}-{datetime.now():%Y%m%d-%H%M%S}"


def _resolve_dirs(args: TrainArgs) -> tuple[Path, Path | None]:
    """(output folder, explicit checkpoint folder or None) from --output-dir and --resume PATH."""
    explicit: Path | None = None
    out = Path(args.output_dir) if args.output_dir else None
    if isinstance(args.resume, str) and args.resume:
        path = Path(args.resume)
        if (path / ckpt.MANIFEST).is_file():
            explicit, run = path, path.parent.parent
        elif path.is_dir():
            run = path
        else:
            raise ResumeError(f"--resume {path}: no such run folder or checkpoint")
        out = out or run
    if out is None:
        if args.resume:
            raise ResumeError("--resume needs --output-dir (or --resume RUN_FOLDER)")
        out = _default_output_dir(args)
    return out, explicit


def _accelerator(args: TrainArgs, out: Path):
    from accelerate import Accelerator

    mixed = "no"
    if args.dtype == "bf16":
        mixed = "bf16"
    elif args.dtype == "fp16" and torch.cuda.is_available():
        mixed = "fp16"
    # Under torchrun without GPUs accelerate only forms a (gloo) process group when told to use the CPU.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    trackers = {"log_with": args.report_to, "project_dir": str(out / "runs")} if args.report_to else {}
    plugins = dist.accelerator_kwargs(dist.resolve_mode(args), args)  # DeepSpeed ZeRO: its plugin
    return Accelerator(mixed_precision=mixed, cpu=multi_cpu, **trackers, **plugins)


def train(
    args: TrainArgs,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    train_examples: list[dict] | None = None,
    val_examples: list[dict] | None = None,
    log=print,
) -> TrainResult:
    """Fine-tune `args.model` on `args.dataset` with `args.tuner`; see TrainArgs for every field.

    A base `model` (not yet tuned), a `tokenizer` and pre-tokenized examples may be passed instead
    of names (tests, notebooks); the output-folder, checkpoint and resume rules are the same.

    Raises:
        ConfigError, DataError, ModelError: invalid arguments, data or model (before training).
        OutputDirError, ResumeError, NothingToDo: output folder / resume problems.
        DivergedError, GradientCheckError: training guards. Interrupted: SIGTERM/SIGINT, saved.
    """
    from deltatune.models import get_model_spec

    started = time.time()
    args.validate()
    task = get_task(args.task)
    if args.packing and not getattr(task, "supports_packing", False):
        raise ConfigError(f"--task {task.name} does not support --packing (it keeps one example per row); drop it")
    if hasattr(task, "check_args"):
        task.check_args(args)
    model_spec = get_model_spec(args.model) if model is None else None
    build_tuner_config(args.tuner, args.tuner_args, model_spec)  # validated before anything loads
    out, explicit = _resolve_dirs(args)
    check_tracker(args.report_to)
    accelerator = _accelerator(args, out)
    is_main = accelerator.is_main_process
    sharded = dist.resolve_mode(args) == "fsdp" and accelerator.num_processes > 1  # FSDP2: collective forwards
    say = log if is_main else (lambda *_: None)
    lock = RunLock(out).acquire() if is_main else None
    try:
        if is_main:
            prepare_output_dir(out, resume=bool(args.resume), overwrite=args.overwrite)
        accelerator.wait_for_everyone()

        # -- data (processor first: the data is validated before the model loads) -----------------
        processor = task.load_processor(args, say, given=tokenizer)
        if train_examples is None:
            data = task.prepare_data(args, processor, say)
        else:
            data = TaskData(list(train_examples), list(val_examples or []))
        steps = StepData(
            data.train, batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed,
            world_size=accelerator.num_processes, rank=accelerator.process_index, group_by_length=args.group_by_length,
            split_by_length=args.split_by_length, collate_fn=task.collate, length=getattr(task, "length", None),
        )  # fmt: skip
        total = args.total_steps(steps.steps_per_epoch)
        layout = {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "world_size": accelerator.num_processes,
                  "group_by_length": args.group_by_length, "split_by_length": args.split_by_length}  # fmt: skip
        data_fp = fingerprint(data.train, {"seed": args.seed, **layout})

        # -- tuner config (a task whose defaults depend on the model loads it first) ----------------
        config = _tuner_config(task, args, model, model_spec)
        base_loaded = config is None
        if base_loaded:
            model = _load_base(task, args, data, say)
            config = _tuner_config(task, args, model, model_spec)
        task_shape = task.structural() if hasattr(task, "structural") else {}
        shape = structural(
            config, task=args.task, model=args.model, tuner=args.tuner, max_length=args.max_length, **task_shape,
            **{k: v for k, v in data.info.items() if k in ("num_labels", "labels", "image_size")},
        )  # fmt: skip
        config_hash = stable_hash(shape)

        # -- which checkpoint, if any ---------------------------------------------------------------
        checkpoints = out / "checkpoints"
        found = None
        if args.resume:
            found = (explicit, ckpt.verify(explicit)) if explicit else ckpt.find_latest(checkpoints, log=say)
            if found is None:
                say(f"--resume: no complete checkpoint in {checkpoints}; starting from step 0")
            else:
                saved_args = ckpt.read_json(found[0] / "train_args.json")
                changes = diff(saved_args["structural"], shape)
                if changes:
                    raise ResumeError(
                        f"cannot resume {found[0]}: the structural config changed ({'; '.join(changes)}); "
                        "restore those settings or start a new run with --overwrite / another --output-dir"
                    )
                if found[1].get("data_fingerprint") != data_fp and not dist.remapped(
                    saved_args.get("layout", {}), layout, found[1].get("data_fingerprint"),
                    lambda old: fingerprint(data.train, {"seed": args.seed, **old}), say,
                ):  # fmt: skip
                    old_layout = saved_args.get("layout", {})
                    extra = "; ".join(diff(old_layout, layout)) or "same batch layout, different rows/tokens"
                    raise ResumeError(
                        f"cannot resume {found[0]}: the training data changed ({extra}); exact resume needs "
                        "the same dataset, seed and batch layout"
                    )
                state = ckpt.read_json(found[0] / "trainer_state.json")
                check_knobs(saved_args["args"], args, step=found[1]["step"], saved_total=state.get("total_steps"),
                            total=total, allow=args.allow_changes, log=say)  # fmt: skip
                missing = missing_outputs(out, plot=args.plot) if found[1]["step"] >= total else []
                if missing:  # killed, or the disk filled, between the last checkpoint and the outputs
                    say(f"{found[0].name} is the run's last step; writing what is missing ({', '.join(missing)})")
                elif found[1]["step"] >= total:
                    raise NothingToDo(
                        f"nothing to do: {found[0]} is at step {found[1]['step']} and max_steps is {total}; "
                        "raise --max-steps / --num-epochs to train further"
                    )
        if is_main:
            ckpt.remove_stale_temps(checkpoints)
            ckpt.write_json(out / "run.json", {"args": _jsonable(args), "structural": shape, "layout": layout,
                                               "task": args.task, "data": data.info})  # fmt: skip
        metrics = MetricsLog(out / "logs.jsonl")
        if args.report_to:
            metrics = TrackedLog(metrics, accelerator, out, _jsonable(args))
        start_step = found[1]["step"] if found else 0
        if is_main and metrics.path.exists():
            # records of steps after the checkpoint are redone; without a checkpoint, all of them
            if found:
                metrics.truncate_after(start_step)
            else:
                metrics.path.unlink()

        # -- model and adapter (seeded: new heads, adapter init) ------------------------------------
        if model is None:
            model = _load_base(task, args, data, say)
        elif not base_loaded:
            torch.manual_seed(args.seed)  # adapter init
        tuned = model if isinstance(model, TunedModel) else get_tuned_model(model, config)
        tuned.provenance = {"chat_template_sha256": template_sha256(getattr(processor, "chat_template", None))}
        if getattr(tuned, "config", None) is not None and hasattr(tuned.config, "use_cache"):
            tuned.config.use_cache = False
        if args.gradient_checkpointing:
            tuned.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            tuned.enable_input_require_grads()  # so reentrant variants also reach the adapters
        dist.record_shapes(tuned, tuned.active_adapters[0])  # every adapter save is checked against these
        if sharded:
            units = dist.shard_fsdp2(tuned, accelerator.device, accelerator.num_processes, args.dtype)
            say(f"FSDP2 over {accelerator.num_processes} processes: {units['adapter']} adapter units, "
                f"{units['block']} blocks and {units['other']} other modules (frozen weights only)")  # fmt: skip
        named = trainable_parameters(tuned)
        param_names = [n for n, _ in named]
        optimizer = build_optimizer(
            named, lr=args.lr, weight_decay=args.weight_decay, loraplus_lr_ratio=args.loraplus_lr_ratio
        )
        if found:
            _restore(found[0], tuned, optimizer, param_names, accelerator)
            apply_knobs(optimizer, args)  # this run's weight decay / LoRA+ ratio (checked by check_knobs)
            say(f"resumed from {found[0]} (step {start_step})")
        trainable, all_params = tuned.get_nb_trainable_parameters()
        adapter = tuned.adapters[tuned.active_adapters[0]]
        saved = (
            f" + {', '.join(adapter.saved_modules)} trained in full" if getattr(adapter, "saved_modules", None) else ""
        )
        say(f"{args.tuner} on {len(adapter.targets)} modules{saved}")
        say(f"trainable params: {trainable:,d} of {all_params:,d} ({100 * trainable / all_params:.3f}%)")
        tuned.to(accelerator.device)
        if sharded:  # already FSDP2-sharded: accelerate must not wrap it (in DDP) again
            prepared, optimizer = tuned, accelerator.prepare(optimizer)
        else:
            prepared, optimizer = accelerator.prepare(tuned, optimizer)
        device = accelerator.device

        result = TrainResult(output_dir=out, adapter_dir=out / "adapter", steps=start_step, resumed_from=start_step)
        result.is_main_process = is_main
        if found is None:
            result.eval_before = task.evaluate(tuned, data, args, device) if is_main or sharded else None
            before = _samples(task, tuned, data, args, device) if is_main or sharded else []
            if result.eval_before and is_main:
                metrics.write({"event": "eval", "step": 0, **result.eval_before})
            if is_main and before:
                metrics.write(
                    {"event": "samples", "step": 0, "answers": [s["output"] for s in before], "samples": before}
                )
        else:
            records = metrics.read()
            result.eval_before = next(
                ({k: v for k, v in r.items() if k not in ("event", "step")} for r in records
                 if r.get("event") == "eval" and r["step"] == 0), None
            )  # fmt: skip
            before = next((r.get("samples", []) for r in records if r.get("event") == "samples" and r["step"] == 0), [])
        if result.eval_before:
            say(headline(result.eval_before, "before"))
        accelerator.wait_for_everyone()

        # -- steps -----------------------------------------------------------------------------------
        warmup = int(args.warmup_ratio * total)
        stop = {"signal": None}
        previous = _install_signal_handlers(stop)
        pending_grad_check = set(param_names) if start_step < args.grad_check_steps else set()
        bad_steps: list[int] = []
        progress = _progress(args, total, start_step, is_main)
        prepared.train()
        try:
            for step in range(start_step, total):
                t0 = time.time()
                micro = [{k: v.to(device) for k, v in mb.items()} for mb in steps.micro_batches(step)]
                local_units = sum(task.units(mb) for mb in micro)  # supervised tokens, rows, ...
                global_units = int(accelerator.reduce(torch.tensor(local_units, device=device), "sum"))
                loss_sum = torch.zeros((), device=device)
                for i, batch in enumerate(micro):
                    sync = i == len(micro) - 1
                    with _no_sync(accelerator, prepared, sync), accelerator.autocast():
                        part = task.loss_sum(prepared, batch)
                        accelerator.backward(part / max(global_units, 1) * accelerator.num_processes)
                    loss_sum += part.detach().float()
                loss = float(accelerator.reduce(loss_sum, "sum")) / max(global_units, 1)
                if sharded:
                    grad_norm = dist.clip_grad_norm([p for _, p in named], args.max_grad_norm)
                else:
                    grad_norm = _clip(accelerator, [p for _, p in named], args.max_grad_norm)
                number = step + 1
                finite = math.isfinite(loss) and math.isfinite(grad_norm)
                if not finite:  # skip the update: parameters stay finite, so checkpoints stay clean
                    bad_steps.append(number)
                    say(f"step {number}: non-finite loss/gradient (loss {loss}, grad norm {grad_norm}); update skipped")
                    recent = bad_steps[-args.nan_patience :]
                    if len(recent) == args.nan_patience and recent[0] == number - args.nan_patience + 1:
                        raise DivergedError(
                            f"loss or gradients were non-finite at steps {recent}; stopped without saving that "
                            "state. Lower --lr, use --dtype fp32/bf16, or check the data"
                        )
                elif pending_grad_check:
                    pending_grad_check -= {n for n, p in named if p.grad is not None and dist.grad_is_nonzero(p)}
                    if pending_grad_check and number >= min(args.grad_check_steps, total) and number >= 2:
                        missing = sorted(pending_grad_check)
                        raise GradientCheckError(
                            f"{len(missing)} trainable tensors got no non-zero gradient in the first {number} steps "
                            f"(e.g. {missing[:3]}); with --gradient-checkpointing make inputs require grad, and build the "
                            "optimizer after adding the adapter"
                        )
                lr = args.lr * lr_factor(step, total, warmup, args.lr_scheduler)
                set_lr(optimizer, lr)
                if finite:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                elapsed = time.time() - t0
                kind, size = _throughput(micro)
                size *= accelerator.num_processes
                cursor = steps.cursor(step)
                record = {"event": "train", "step": number, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                          kind: size, f"{kind}_per_s": size / max(elapsed, 1e-9), "epoch": cursor.epoch,
                          "seconds": elapsed}  # fmt: skip
                if hasattr(task, "step_metrics"):  # the task's own numbers of this step (e.g. grpo's mean reward)
                    record.update(task.step_metrics())
                result.losses.append(loss)
                if is_main:
                    metrics.write(record)
                    progress.set_postfix(
                        loss=f"{loss:.4f}", lr=f"{lr:.2e}", **{f"{kind[:3]}_s": f"{record[f'{kind}_per_s']:.0f}"}
                    )
                    progress.update(1)
                result.steps = number
                maybe_fault("after_step", number)
                due = args.eval_steps and number % args.eval_steps == 0 and number < total and data.val
                if due and (is_main or sharded):
                    scores = task.evaluate(tuned, data, args, device)
                    if is_main:
                        metrics.write({"event": "eval", "step": number, **scores})
                if number % args.save_steps == 0 or number == total or stop["signal"]:
                    accelerator.wait_for_everyone()
                    with dist.full_view(tuned, optimizer, sharded) as full_optimizer:  # gathered on every rank
                        if is_main:
                            _save(checkpoints, number, tuned, full_optimizer, param_names, steps, total, args, shape,
                                  layout, config_hash, data_fp, accelerator)  # fmt: skip
                    accelerator.wait_for_everyone()
                    maybe_fault("after_save", number)
                if stop["signal"]:
                    raise Interrupted(
                        f"stopped by {stop['signal']} after step {number}; checkpoint saved, continue with "
                        f"--resume --output-dir {out}"
                    )
        except torch.cuda.OutOfMemoryError as err:  # name the step (the CLI exits 15 with the fix)
            raise type(err)(f"at step {step + 1} of {total}: {str(err).splitlines()[0] if str(err) else ''}") from err
        finally:
            progress.close()
            _restore_signal_handlers(previous)

        # -- after ----------------------------------------------------------------------------------
        # A sharded model's forwards are collective: every rank evaluates, the main process reports;
        # its adapter is gathered on every rank (full_view) and written by the main process.
        shared = None
        if sharded:
            shared = (task.evaluate(tuned, data, args, device), _samples(task, tuned, data, args, device))
        with dist.full_view(tuned, None, sharded):
            if is_main:
                result.eval_after = shared[0] if shared else task.evaluate(tuned, data, args, device)
                if result.eval_after:
                    metrics.write({"event": "eval", "step": total, **result.eval_after})
                    say(headline(result.eval_after, "after"))
                after = shared[1] if shared else _samples(task, tuned, data, args, device)
                for a, b in zip(before, after):
                    result.samples.append({"prompt": a["prompt"], "reference": a.get("reference", ""),
                                           "before": a["output"], "after": b["output"]})  # fmt: skip
                _save_adapter(tuned, out / "adapter")
                if hasattr(task, "finish"):
                    task.finish(tuned, out, data, args, say)
                if args.plot:
                    result.plot = plot_losses(metrics.read(), out / "loss.png")
                result.losses = [loss for _, loss in metrics.train_losses()]
        accelerator.wait_for_everyone()
        if args.report_to:
            metrics.close()
        result.seconds = time.time() - started
        return result
    finally:
        if lock is not None:
            lock.release()


# -- pieces of the loop --------------------------------------------------------------------------
def _jsonable(args: TrainArgs) -> dict[str, Any]:
    return {
        k: (v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v))
        for k, v in args.to_dict().items()
    }


def _tuner_config(task, args: TrainArgs, model, model_spec):
    """The run's tuner config: --tuner-args over the task's defaults; None while the task needs the
    model for them and it is not loaded yet."""
    if isinstance(model, TunedModel):
        return model.peft_config[model.active_adapters[0]]
    defaults = task.tuner_defaults(args, model, model_spec)
    if defaults is None:
        return None
    tuner_args = dict(args.tuner_args)
    if defaults.get("modules_to_save") and tuner_args.get("modules_to_save"):  # a task's new head always trains
        tuner_args["modules_to_save"] = list(
            dict.fromkeys([*tuner_args["modules_to_save"], *defaults["modules_to_save"]])
        )
    return config_from_args(args.tuner, tuner_args, defaults)


def _load_base(task, args: TrainArgs, data: TaskData, say):
    torch.manual_seed(args.seed)  # new heads; the adapter init follows
    say(f"loading {args.model} ...")
    return task.load_model(args, data, say)


def _samples(task, model, data: TaskData, args: TrainArgs, device) -> list[dict[str, str]]:
    """The task's sample outputs ({"prompt", "reference", "output"}), if it has any."""
    if not hasattr(task, "samples") or args.num_samples == 0:
        return []
    return task.samples(model, data, args, device)


def _throughput(micro: list[dict[str, torch.Tensor]]) -> tuple[str, int]:
    """("tokens", real tokens) for token batches, else ("rows", rows) of a step's micro-batches."""
    if all("attention_mask" in mb for mb in micro):
        return "tokens", sum(int(mb["attention_mask"].sum()) for mb in micro)
    return "rows", sum(len(next(iter(mb.values()))) for mb in micro)


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _no_sync(accelerator, model, sync: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
    if sync or accelerator.num_processes == 1:
        return _NullContext()
    return accelerator.no_sync(model)


def _clip(accelerator, params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Global gradient norm before clipping (clipped to max_norm when > 0)."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(grads, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in grads])))


def _progress(args: TrainArgs, total: int, start: int, is_main: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=start, desc="sft", unit="step", disable=not (args.progress and is_main), dynamic_ncols=True
    )


def _install_signal_handlers(stop: dict) -> dict:
    """SIGTERM/SIGINT set a flag; the loop checkpoints after the current step and stops."""
    previous = {}

    def handler(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    return previous


def _restore_signal_handlers(previous: dict) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)


def _save(root: Path, step: int, tuned: TunedModel, optimizer, param_names: list[str], steps: StepData, total: int,
          args: TrainArgs, shape: dict, layout: dict, config_hash: str, data_fp: str, accelerator) -> Path:  # fmt: skip
    """One checkpoint; refuses to save a non-finite adapter."""
    adapter_name = tuned.active_adapters[0]
    state = tuned.adapter_state_dict(adapter_name)
    dist.check_saveable(state, dist.recorded_shapes(tuned), f"checkpoint step-{step}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise DivergedError(f"adapter tensors became non-finite at step {step} (e.g. {bad[0]}); not checkpointing them")
    cursor = steps.cursor(step)
    scaler = getattr(accelerator, "scaler", None)

    def write(folder: Path) -> None:
        tuned.save_pretrained(folder / "adapter", selected_adapters=[adapter_name])
        tensors, meta = ckpt.optimizer_to_files(getattr(optimizer, "optimizer", optimizer), param_names)
        ckpt.save_tensors(tensors, folder / "optimizer.safetensors")
        ckpt.write_json(folder / "optimizer.json", meta)
        ckpt.write_json(folder / "trainer_state.json", {
            "step": step, "total_steps": total, "adapter_name": adapter_name,
            "cursor": {"epoch": cursor.epoch, "position": cursor.position, "permutation_seed": cursor.permutation_seed},
            "scheduler": {"kind": args.lr_scheduler, "warmup_ratio": args.warmup_ratio, "peak_lr": args.lr},
            "rng": ckpt.rng_state(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        })  # fmt: skip
        ckpt.write_json(folder / "train_args.json", {"args": _jsonable(args), "structural": shape, "layout": layout})
        maybe_fault("in_save", step)

    meta = {"config_hash": config_hash, "data_fingerprint": data_fp, "world_size": accelerator.num_processes,
            "distributed": dist.resolve_mode(args) or ("ddp" if accelerator.num_processes > 1 else None)}  # fmt: skip
    return ckpt.save_checkpoint(root, step, write, meta, keep=args.save_total_limit)


def _restore(folder: Path, tuned: TunedModel, optimizer, param_names: list[str], accelerator) -> None:
    from deltatune.io.peft_format import read_tensors

    state = ckpt.read_json(folder / "trainer_state.json")
    with dist.full_view(tuned):  # sharded (FSDP2): loaded full, scattered into the shards on leaving
        tuned.load_adapter_state_dict(state["adapter_name"], read_tensors(folder / "adapter"), source=str(folder))
    tensors = ckpt.load_tensors(folder / "optimizer.safetensors")
    ckpt.optimizer_from_files(optimizer, tensors, ckpt.read_json(folder / "optimizer.json"), param_names)
    dist.reshard_optimizer_state(optimizer)  # full tensors of any world size -> this run's shards
    ckpt.set_rng_state(state["rng"])
    if state.get("scaler") and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(state["scaler"])


def _save_adapter(tuned: TunedModel, final: Path) -> None:
    """The final PEFT-format adapter, written beside and renamed into place (a failed write cleans up)."""
    state = tuned.adapter_state_dict(tuned.active_adapters[0])
    dist.check_saveable(state, dist.recorded_shapes(tuned), f"adapter {final}")
    save_final_adapter(tuned, final)

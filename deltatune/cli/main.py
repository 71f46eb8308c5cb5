"""`deltatune`: fine-tune, run, evaluate, export and inspect adapters from the command line.

    deltatune sft                      # the embedded demo: SmolLM2-135M + LoRA on chatterbot, ~3 min
    deltatune sft --model M --dataset D --output-dir OUT --max-steps 200
    deltatune sft --task image-classification --model efficientnet-lite0 --dataset fashion-mnist#1000
    deltatune infer --model M --adapter OUT/adapter --prompt "Hello"
    deltatune infer --model M --adapter OUT/adapter          # chat on a terminal; one prompt a line from a pipe
    deltatune eval --model M --adapter OUT/adapter --dataset D
    deltatune export --model M --adapter OUT/adapter --output-dir merged --merge
    deltatune merge --model M --adapter a=A --adapter b=B --weights 0.7,0.3 --method ties --density 0.5 --output-dir OUT
    deltatune inspect --model M --tuner lora --tuner-args r=16,target_modules=all-linear

Errors print one line (the problem and the fix) and exit with a status per kind of problem
(deltatune.cli.errors); --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from deltatune.cli.errors import INTERNAL, OK, describe, exit_code
from deltatune.core.config import field_docs
from deltatune.export.cli import add_download_hub_flag, add_export_flags
from deltatune.suggest import SuggestingParser
from deltatune.tasks.registry import task_names
from deltatune.train.args import TrainArgs

TASK_NAMES = task_names()

# Flags of `sft`, in help order, as (flag, TrainArgs field, argparse options).
_SFT_FLAGS: list[tuple[str, str, dict]] = [
    ("--task", "task", {"choices": list(TASK_NAMES)}),
    ("--model", "model", {}),
    ("--dataset", "dataset", {}),
    ("--tuner", "tuner", {}),
    ("--tuner-args", "tuner_args", {"metavar": "KEY=VALUE,..."}),
    ("--output-dir", "output_dir", {}),
    ("--batch-size", "batch_size", {"type": int}),
    ("--grad-accum", "grad_accum", {"type": int}),
    ("--lr", "lr", {"type": float}),
    ("--lr-scheduler", "lr_scheduler", {"choices": ["cosine", "linear", "constant"]}),
    ("--warmup-ratio", "warmup_ratio", {"type": float}),
    ("--weight-decay", "weight_decay", {"type": float}),
    ("--max-grad-norm", "max_grad_norm", {"type": float}),
    ("--loraplus-lr-ratio", "loraplus_lr_ratio", {"type": float}),
    ("--seed", "seed", {"type": int}),
    ("--max-length", "max_length", {"type": int}),
    ("--split-by-length", "split_by_length", {"action": argparse.BooleanOptionalAction}),
    ("--group-by-length", "group_by_length", {"action": argparse.BooleanOptionalAction}),
    ("--val-size", "val_size", {"type": float}),
    ("--max-bad-fraction", "max_bad_fraction", {"type": float}),
    ("--save-steps", "save_steps", {"type": int}),
    ("--save-total-limit", "save_total_limit", {"type": int}),
    ("--eval-steps", "eval_steps", {"type": int}),
    ("--packing", "packing", {"action": argparse.BooleanOptionalAction}),
    ("--report-to", "report_to", {"choices": ["tensorboard", "wandb", "mlflow"]}),
    ("--resume", "resume", {"nargs": "?", "const": True, "metavar": "PATH"}),
    ("--allow-changes", "allow_changes", {"action": "store_true"}),
    ("--overwrite", "overwrite", {"action": "store_true"}),
    ("--gradient-checkpointing", "gradient_checkpointing", {"action": "store_true"}),
    ("--dtype", "dtype", {"choices": ["fp32", "bf16", "fp16"]}),
    ("--quantize", "quantize", {"choices": ["4bit", "8bit"]}),
    ("--nan-patience", "nan_patience", {"type": int}),
    ("--num-samples", "num_samples", {"type": int}),
    ("--max-new-tokens", "max_new_tokens", {"type": int}),
    ("--trust-remote-code", "trust_remote_code", {"action": "store_true"}),
    ("--distributed", "distributed", {"choices": ["ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"]}),
    ("--accelerate-config", "accelerate_config", {"metavar": "FILE"}),
]


def _add_common_model_flags(parser: argparse.ArgumentParser, *, adapter: str | None = "optional") -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registry name, local folder or hub id")
    if adapter is not None:
        parser.add_argument("--adapter", required=adapter == "required", help="adapter folder (PEFT format)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="base weight dtype")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow a hub model's own Python code to run (off by default)"
    )
    _add_threads_flag(parser)


def _add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the cores this process may use)",
    )  # fmt: skip


_COMPUTING = ("sft", "rlhf", "infer", "eval", "export", "serve", "merge")  # commands that run the model: --threads, and the policy line


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(prog="deltatune", description="Parameter-efficient fine-tuning from the command line.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    docs = field_docs(TrainArgs)
    sft = sub.add_parser(
        "sft", help="supervised fine-tuning with an adapter", argument_default=argparse.SUPPRESS,
        description="Supervised fine-tuning. With no arguments: SmolLM2-135M-Instruct + LoRA on chatterbot-en.",
    )  # fmt: skip
    sft.add_argument("--debug", action="store_true", default=False, help="show tracebacks")
    sft.add_argument("--config", metavar="FILE.yaml", help="YAML with the same keys as the flags; flags override it")
    steps = sft.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=int, help=docs.get("max_steps"))
    steps.add_argument("--num-epochs", type=float, help=docs.get("num_epochs"))
    for flag, name, options in _SFT_FLAGS:
        sft.add_argument(flag, dest=name, help=docs.get(name), **options)
    _add_threads_flag(sft)
    _add_rlhf_parser(sub, docs)  # `deltatune rlhf --method dpo|...`: sft's flags + the method's own

    infer = sub.add_parser("infer", help="answer prompts with a model (+ adapter)")
    _add_common_model_flags(infer)
    add_download_hub_flag(infer)  # --hub modelscope
    source = infer.add_mutually_exclusive_group()  # neither: chat from stdin (deltatune/cli/chat.py)
    source.add_argument("--prompt", help="one user message (the answer streams); without --prompt/--dataset: chat")
    source.add_argument("--dataset", help="dataset spec: answer the user turn of each row")
    infer.add_argument("--merge", action="store_true", help="fold the adapter into the weights first (faster)")
    infer.add_argument("--max-new-tokens", type=int, default=64)
    infer.add_argument("--batch-size", type=int, default=8)
    infer.add_argument("--limit", type=int, default=20, help="rows of --dataset to answer")
    infer.add_argument("--seed", type=int, default=42, help="seeds #N sampling of --dataset")

    evaluate = sub.add_parser("eval", help="held-out loss, perplexity and ROUGE-L")
    _add_common_model_flags(evaluate)
    add_download_hub_flag(evaluate)  # --hub modelscope
    evaluate.add_argument("--dataset", required=True, help="dataset spec")
    evaluate.add_argument(
        "--task", default="causal-lm", choices=list(TASK_NAMES), help="whose metrics (as `sft --task`)"
    )
    evaluate.add_argument("--max-length", type=int, default=96)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--generate", type=int, default=32, help="rows answered for ROUGE-L (0: loss only)")
    evaluate.add_argument("--max-new-tokens", type=int, default=48)
    evaluate.add_argument("--seed", type=int, default=42, help="seeds #N sampling of --dataset")
    evaluate.add_argument("--output", help="also write the metrics as JSON to this file")

    export = sub.add_parser("export", help="a merged model, or a cleaned PEFT adapter")
    _add_common_model_flags(export, adapter="required")
    export.add_argument("--output-dir", required=True)
    export.add_argument("--merge", action="store_true", help="write the merged model (plain transformers folder)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    export.add_argument(
        "--for", dest="for_server", choices=["vllm"], default=None,
        help="vllm: check the adapter against vLLM's LoRA support, write a folder vLLM loads and the `vllm serve` command",
    )  # fmt: skip
    add_export_flags(export)  # --to gguf/gguf-lora, --gguf-type, --ollama, --push-to-hub, --hub, --private, --dry-run

    from deltatune.cli import merge as merge_command

    merge_command.add_parser(sub)  # deltatune merge: adapter arithmetic (cli/merge.py)

    inspect = sub.add_parser("inspect", help="what a tuner would target and train, without loading weights")
    inspect.add_argument("--model", default="smollm2-135m-instruct", help="registry name, local folder or hub id")
    inspect.add_argument("--tuner", default="lora")
    inspect.add_argument("--tuner-args", default="", metavar="KEY=VALUE,...")
    inspect.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    inspect.add_argument("--quantize", choices=["4bit", "8bit"])
    inspect.add_argument("--trust-remote-code", action="store_true")
    inspect.add_argument("--show", type=int, default=12, help="matched module names to list")

    serve = sub.add_parser("serve", help="an OpenAI-compatible server: base model + many adapters, batched together")
    _add_common_model_flags(serve, adapter=None)
    from deltatune.serve.server import add_flags as add_serve_flags

    add_serve_flags(serve)

    sub.add_parser("models", help="list the model registry")
    datasets = sub.add_parser("datasets", help="list the dataset catalogue")
    datasets.add_argument("--offline", action="store_true", help="only data sets that work offline")
    webui = sub.add_parser("webui", help="fine-tune, watch, chat, evaluate and export from a browser (Gradio)")
    webui.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    webui.add_argument("--port", type=int, default=7860)
    webui.add_argument(
        "--password", default=None,
        help="required when --host is not this machine (or set DELTATUNE_WEBUI_PASSWORD); any user name",
    )  # fmt: skip
    webui.add_argument("--runs-dir", default="runs", help="folder for new runs, listed in the Runs tab")
    return parser


RLHF_METHODS = ("dpo", "ipo", "orpo", "simpo", "cpo", "kto", "rm", "grpo")
"""`deltatune rlhf --method` values (each a task in deltatune/tasks/registry.py)."""


def _add_rlhf_parser(sub, docs: dict) -> None:
    rlhf = sub.add_parser(
        "rlhf", help="preference and RL training (DPO, IPO, ORPO, SimPO, CPO, KTO, reward models, GRPO) with an adapter",
        argument_default=argparse.SUPPRESS,
        description="Preference training on the same engine as sft (exact resume, checkpoints, logs). With only "
        "--method dpo: SmolLM2-135M-Instruct + LoRA on the offline chatterbot-pref-en pairs.",
    )  # fmt: skip
    rlhf.add_argument("--debug", action="store_true", default=False, help="show tracebacks")
    rlhf.add_argument("--config", metavar="FILE.yaml", help="YAML with the same keys as the flags; flags override it")
    rlhf.add_argument("--method", dest="task", choices=list(RLHF_METHODS), default="dpo", help="training method")
    steps = rlhf.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=int, help=docs.get("max_steps"))
    steps.add_argument("--num-epochs", type=float, help=docs.get("num_epochs"))
    for flag, name, options in _SFT_FLAGS:
        if name not in ("task", "packing"):
            rlhf.add_argument(flag, dest=name, help=docs.get(name), **options)
    rlhf.add_argument("--beta", dest="beta", type=float, help=docs.get("beta"))
    rlhf.add_argument("--loss-type", dest="loss_type", help=docs.get("loss_type"))
    rlhf.add_argument("--ref-adapter", dest="ref_adapter", metavar="FOLDER", help=docs.get("ref_adapter"))
    rlhf.add_argument("--num-generations", dest="num_generations", type=int, help=docs.get("num_generations"))
    rlhf.add_argument("--reward", dest="reward", help=docs.get("reward"))
    rlhf.add_argument("--method-args", dest="method_args", metavar="KEY=VALUE,...", help=docs.get("method_args"))
    _add_threads_flag(rlhf)


def rlhf_args(ns: argparse.Namespace) -> TrainArgs:
    """TrainArgs of `deltatune rlhf`: sft's rules, the method's demo data set and learning rate by default."""
    from deltatune.cli.parsing import parse_tuner_args

    given = vars(ns)
    if "method_args" in given:
        given["method_args"] = parse_tuner_args(given["method_args"])
    args = sft_args(ns)
    explicit = set(given) | set(_config_keys(ns))
    if "dataset" not in explicit:
        args.dataset = {"kto": "chatterbot-kto-en", "grpo": "arithmetic-prompts"}.get(args.task, "chatterbot-pref-en")
    if "lr" not in explicit:
        args.lr = 5e-4
    return args


def _config_keys(ns: argparse.Namespace) -> list[str]:
    if not getattr(ns, "config", None):
        return []
    from deltatune.cli.parsing import read_config_file

    return [str(k).replace("-", "_") for k in read_config_file(ns.config)]


def sft_args(ns: argparse.Namespace) -> TrainArgs:
    """TrainArgs from defaults <- --config file <- flags (flags win)."""
    from deltatune.cli.parsing import parse_tuner_args, read_config_file

    given = {k: v for k, v in vars(ns).items() if k not in ("command", "debug", "config", "threads")}
    args = TrainArgs()
    if getattr(ns, "config", None):
        data = read_config_file(ns.config)
        args = args.updated(data, source=ns.config)
        if "num_epochs" in {k.replace("-", "_") for k in data} and "max_steps" not in {
            k.replace("-", "_") for k in data
        }:
            args = args.updated({"max_steps": None})
    if "tuner_args" in given:
        given["tuner_args"] = {**args.tuner_args, **parse_tuner_args(given["tuner_args"])}
    if "num_epochs" in given:
        given["max_steps"] = None
    elif "max_steps" in given:
        given["num_epochs"] = None
    trust = given.pop("trust_remote_code", False)
    args = args.updated(given, source="command line")
    if trust:
        args.trust_remote_code = True
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns = parser.parse_args(argv)
    debug = bool(getattr(ns, "debug", False)) or "--debug" in argv or os.environ.get("DELTATUNE_DEBUG") == "1"
    try:
        from deltatune.cli import commands

        handler = getattr(commands, f"run_{'sft' if ns.command == 'rlhf' else ns.command}")
        if ns.command in _COMPUTING:
            from deltatune.runtime import apply_thread_policy

            apply_thread_policy(vars(ns).pop("threads", None))
        if ns.command == "sft":
            return handler(sft_args(ns)) or OK
        if ns.command == "rlhf":
            return handler(rlhf_args(ns)) or OK
        import torch

        with torch.no_grad():  # inference-only commands; scoped, so in-process callers keep grad mode
            return handler(ns) or OK
    except KeyboardInterrupt:
        print("deltatune: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place errors become exit statuses
        code = exit_code(err)
        if debug or code is None:
            import traceback

            traceback.print_exc()
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if code is None:
            print(
                f"deltatune: internal error: {type(err).__name__}: {first} (this is a bug; rerun with --debug)",
                file=sys.stderr,
            )
            return INTERNAL
        print(f"deltatune: {describe(err)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())

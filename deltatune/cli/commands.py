"""The subcommands. Each takes parsed arguments, prints its results, and raises on problems
(deltatune.cli.main turns errors into one line and an exit status)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any


# -- sft --------------------------------------------------------------------------------------------
def run_sft(args) -> int:
    from deltatune.train import train

    started = time.time()
    result = train(args)
    if not result.is_main_process:
        return 0
    print()
    print("=" * 72)
    before, after = result.eval_before or {}, result.eval_after or {}
    if before and after and "perplexity" in after:
        print(f"held-out loss   before {before['loss']:.4f}  ->  after {after['loss']:.4f}"
              f"   (perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f},"
              f" {after['tokens']} {'answer tokens' if args.task == 'causal-lm' else 'tokens'})")  # fmt: skip
    elif before and after:
        for key, value in after.items():
            if key in before and isinstance(value, float):
                print(f"held-out {key:<9} before {before[key]:.4f}  ->  after {value:.4f}")
        counts = ", ".join(f"{after[k]} {k}" for k in after if not isinstance(after[k], float))
        if counts:
            print(f"({counts} held out)")
    for i, sample in enumerate(result.samples, 1):
        print(f"\n[{i}] user:      {sample['prompt']}")
        print(f"    reference: {sample['reference']}")
        print(f"    before:    {sample['before']}")
        print(f"    after:     {sample['after']}")
    print()
    print(
        f"steps:      {result.steps} (resumed from {result.resumed_from})"
        if result.resumed_from
        else f"steps:      {result.steps}"
    )
    print(f"adapter:    {result.adapter_dir}")
    if result.plot:
        print(f"loss curve: {result.plot}")
    print(f"metrics:    {result.output_dir / 'logs.jsonl'}")
    print(f"wall time:  {time.time() - started:.0f} s")
    return 0


# -- shared loading ---------------------------------------------------------------------------------
def _load(ns, *, adapter: str | None, merge: bool = False) -> tuple[Any, Any]:
    """(model ready for inference, tokenizer); the adapter strictly loaded, optionally merged."""
    from deltatune.core.tuned_model import TunedModel
    from deltatune.io.peft_format import read_config
    from deltatune.models import load_model, load_tokenizer, resolve_model

    if adapter:
        import warnings

        with warnings.catch_warnings():  # the load below reads it again and warns once
            warnings.simplefilter("ignore")
            read_config(adapter)  # validate the adapter's config before any weights load
    source, _ = resolve_model(ns.model, trust_remote_code=ns.trust_remote_code, hub=getattr(ns, "hub", None))
    tokenizer = load_tokenizer(source, trust_remote_code=ns.trust_remote_code)
    model = load_model(source, dtype=ns.dtype, trust_remote_code=ns.trust_remote_code)
    if adapter:
        model = TunedModel.from_pretrained(model, adapter, is_trainable=False)
        from deltatune.io.peft_format import read_provenance
        from deltatune.io.provenance import warn_if_template_differs

        saved = read_provenance(adapter).get("chat_template_sha256")
        warn_if_template_differs(saved, getattr(tokenizer, "chat_template", None), adapter)
        if merge:
            model = model.merge_and_unload()
    model.eval()
    return model, tokenizer


def _chat_rows(spec: str, seed: int) -> list[list[dict[str, str]]]:
    from deltatune.data import DataError, load_rows

    rows, _ = load_rows(spec, seed=seed)
    chats = [r["messages"] for r in rows if "messages" in r]
    if not chats:
        raise DataError(f"{spec}: infer/eval need chat or instruction data (rows with messages)")
    return chats


def _split_last_answer(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str | None]:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return messages, None
    return messages[:last], messages[last]["content"]


# -- infer ------------------------------------------------------------------------------------------
def run_infer(ns) -> int:
    from deltatune.train.evaluate import generate_answers

    model, tokenizer = _load(ns, adapter=ns.adapter, merge=ns.merge)
    if ns.prompt is None and ns.dataset is None:
        from deltatune.cli.chat import chat

        chat(model, tokenizer, max_new_tokens=ns.max_new_tokens)  # a REPL on a terminal, else one prompt a line
        return 0
    if ns.prompt is not None:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        generate_answers(
            model,
            tokenizer,
            [[{"role": "user", "content": ns.prompt}]],
            max_new_tokens=ns.max_new_tokens,
            streamer=streamer,
        )
        return 0
    prompts = [_split_last_answer(m)[0] for m in _chat_rows(ns.dataset, ns.seed)[: ns.limit]]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=ns.max_new_tokens, batch_size=ns.batch_size)
    for prompt, answer in zip(prompts, answers):
        print(f"user:      {prompt[-1]['content']}")
        print(f"assistant: {answer}\n")
    return 0


# -- eval -------------------------------------------------------------------------------------------
def run_eval(ns) -> int:
    if getattr(ns, "task", "causal-lm") != "causal-lm":
        from deltatune.tasks.evaluation import run_task_eval

        return run_task_eval(ns)
    from deltatune.data import encode_rows, pad_token_id
    from deltatune.train.evaluate import evaluate_loss, generate_answers, mean_rouge_l

    model, tokenizer = _load(ns, adapter=ns.adapter)
    chats = _chat_rows(ns.dataset, ns.seed)
    examples, report = encode_rows(tokenizer, [{"messages": m} for m in chats], max_length=ns.max_length)
    metrics: dict[str, Any] = evaluate_loss(model, examples, batch_size=ns.batch_size, pad_id=pad_token_id(tokenizer))
    metrics["rows"] = len(examples)
    print(f"rows: {len(examples)} (of {len(chats)})  answer tokens: {metrics['tokens']}")
    print(f"loss: {metrics['loss']:.4f}  perplexity: {metrics['perplexity']:.2f}")
    if ns.generate:
        pairs = [_split_last_answer(m) for m in chats[: ns.generate]]
        pairs = [(p, ref) for p, ref in pairs if ref is not None]
        answers = generate_answers(
            model, tokenizer, [p for p, _ in pairs], max_new_tokens=ns.max_new_tokens, batch_size=ns.batch_size
        )
        metrics["rouge_l"] = mean_rouge_l(answers, [ref for _, ref in pairs])
        metrics["rouge_l_rows"] = len(pairs)
        print(f"ROUGE-L (F1, {len(pairs)} generated answers): {metrics['rouge_l']:.4f}")
    if ns.output:
        Path(ns.output).write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return 0


def run_merge(ns) -> int:  # deltatune merge (cli/merge.py)
    from deltatune.cli.merge import run_merge as merge

    return merge(ns)


# -- export -----------------------------------------------------------------------------------------
def run_export(ns) -> int:
    if getattr(ns, "for_server", None) == "vllm":
        from deltatune.serve.vllm import export_for_vllm

        return export_for_vllm(ns, _load)
    from deltatune.export.cli import check_flags, push, write_card, write_gguf_export
    from deltatune.train.outdir import check_replaceable, mark_written, replace_folder

    out = Path(ns.output_dir)
    check_replaceable(out, overwrite=ns.overwrite)  # --overwrite replaces only what deltatune wrote
    check_flags(ns)
    to = getattr(ns, "to", "hf")
    model, tokenizer = _load(ns, adapter=ns.adapter, merge=ns.merge or to == "gguf")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if to != "hf":
            what = write_gguf_export(ns, model, tokenizer, tmp)
        elif ns.merge:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            what = "merged model (load with transformers.AutoModelForCausalLM.from_pretrained)"
        else:
            model.save_pretrained(tmp)  # only adapter_config.json, adapter_model.safetensors (+ sidecar)
            what = "PEFT adapter (load with deltatune or peft)"
        if getattr(ns, "push_to_hub", None):
            write_card(ns, tmp)  # README.md model card, uploaded with the files
        if ns.merge or to != "hf" or getattr(ns, "push_to_hub", None):
            # an adapter folder is recognized by its files; a merged model, a GGUF export or a folder
            # with a model card needs the marker for a later --overwrite
            mark_written(tmp, "merged model" if ns.merge else to if to != "hf" else "adapter with model card")
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote {what} to {out}: {files}")
    if getattr(ns, "push_to_hub", None):
        push(ns, out)
    return 0


# -- inspect ----------------------------------------------------------------------------------------
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "4bit": 0.5, "8bit": 1}


def run_inspect(ns) -> int:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from deltatune.cli.parsing import parse_tuner_args
    from deltatune.core.tuned_model import get_tuned_model
    from deltatune.models import get_model_spec, resolve_model
    from deltatune.models.registry import load_config
    from deltatune.train.setup import build_tuner_config

    tuner_args = parse_tuner_args(ns.tuner_args) if ns.tuner_args else {}
    spec = get_model_spec(ns.model)
    config = build_tuner_config(ns.tuner, tuner_args, spec)
    source, _ = resolve_model(ns.model, trust_remote_code=ns.trust_remote_code)
    model_config = load_config(source, trust_remote_code=ns.trust_remote_code)
    with init_empty_weights():
        base = AutoModelForCausalLM.from_config(
            model_config, trust_remote_code=ns.trust_remote_code, dtype=torch.float32
        )
    base.tie_weights()  # shared embeddings count once, as in the loaded model
    total_base = sum(p.numel() for p in base.parameters())
    tuned = get_tuned_model(base, config)
    adapter = tuned.adapters["default"]
    trainable, _ = tuned.get_nb_trainable_parameters()
    base_bytes = total_base * _BYTES[ns.quantize or ns.dtype]
    train_bytes = trainable * 16  # fp32 weight + grad + two AdamW moments
    print(
        f"model:     {ns.model} ({type(base).__name__}, {total_base / 1e6:.1f}M parameters, built on the meta device)"
    )
    print(
        f"tuner:     {ns.tuner} {json.dumps({k: v for k, v in config.to_dict().items() if v not in (None, [], {}, False)}, default=str)}"
    )
    print(
        f"matched:   {len(adapter.targets)} modules"
        + (f" + {len(adapter.saved_modules)} trained in full" if adapter.saved_modules else "")
    )
    leaves: dict[str, int] = {}
    for name in adapter.targets:
        leaves[name.rsplit(".", 1)[-1]] = leaves.get(name.rsplit(".", 1)[-1], 0) + 1
    print("           " + ", ".join(f"{leaf} x{count}" for leaf, count in sorted(leaves.items())))
    for name in adapter.targets[: ns.show]:
        print(f"           {name}")
    if len(adapter.targets) > ns.show:
        print(f"           ... {len(adapter.targets) - ns.show} more")
    print(f"trainable: {trainable:,d} parameters ({100 * trainable / total_base:.3f}% of the base)")
    print(f"memory:    base weights {base_bytes / 2**20:,.0f} MiB ({ns.quantize or ns.dtype}) + adapter training state "
          f"{train_bytes / 2**20:,.1f} MiB (fp32 weights, grads, AdamW moments); activations not included")  # fmt: skip
    return 0


# -- listings ---------------------------------------------------------------------------------------
def run_models(ns) -> int:
    from deltatune.models import is_offline_available, list_models

    rows = [
        (spec.name, spec.family, spec.hf_id or "-", spec.ms_id or "-",
         "yes" if is_offline_available(spec) else "no", "yes" if spec.requires_remote_code else "no")
        for spec in list_models()
    ]  # fmt: skip
    header = ("name", "family", "hugging face", "modelscope", "offline", "remote code")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def run_datasets(ns) -> int:
    from deltatune.data import list_datasets

    for spec in list_datasets(offline_only=ns.offline):
        where = "offline" if spec.offline else (spec.hf_id or spec.ms_id or "")
        print(f"{spec.name:24s} {spec.format:15s} {where}")
    return 0


# -- serve ------------------------------------------------------------------------------------------
def run_serve(ns) -> int:
    from deltatune.serve.server import run

    return run(ns)


def run_webui(ns) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        from deltatune.core.config import ConfigError

        raise ConfigError("deltatune webui needs Gradio: pip install 'deltatune[webui]'") from None
    from deltatune.webui.app import launch

    launch(ns.host, ns.port, ns.password or os.environ.get("DELTATUNE_WEBUI_PASSWORD") or None, ns.runs_dir)
    return 0

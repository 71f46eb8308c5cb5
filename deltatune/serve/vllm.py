"""`deltatune export --for vllm`: check an adapter against what vLLM's LoRA support accepts, write a folder
vLLM loads, and the `vllm serve ... --lora-modules` command: the way to scale out past `deltatune serve`.

What is checked (vLLM's documented LoRA rules; a newer vLLM may accept more, never less):
- LoRA only (vLLM serves no IA3, prompt/prefix tuning or bottleneck adapters): merge those instead;
- no DoRA (`use_dora`), no trained biases (`bias` other than "none"), no `modules_to_save`;
- targets are plain linear layers (no embedding or convolution deltas, no GPT-2 Conv1D);
- one rank and alpha for every module (no `rank_pattern` / `alpha_pattern`), r <= 512 (vLLM's largest
  --max-lora-rank); the command sets --max-lora-rank to the smallest value vLLM offers that fits;
- no PiSSA / OLoRA initialisation (those adapters only reproduce the model on their residual base);
- the model family is one vLLM serves LoRA for; for other families the folder is written with a warning.
The adapter is loaded strictly into the base model first, so a folder that does not fit is never written.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from deltatune.core.config import ConfigError

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for --max-lora-rank."""
VLLM_LORA_FAMILIES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3",
    "gemma3_text", "phi3", "granite", "granitemoe", "olmo", "olmo2", "starcoder2", "internlm2", "baichuan",
    "chatglm", "deepseek_v2", "deepseek_v3", "exaone", "minicpm", "nemotron", "solar", "jamba",
})  # fmt: skip


def check_config(config: Any) -> int:
    """Refuse what vLLM's LoRA loader rejects, from the adapter config alone; returns the rank."""
    from deltatune.core.registry import spec_for_config

    spec = spec_for_config(config)
    fix = "merge it into the base instead (deltatune export --merge) and serve the merged folder with vLLM"
    if spec.name != "lora":
        raise ConfigError(f"vLLM serves LoRA adapters only; this is a {spec.name} adapter: {fix}")
    if config.use_dora:
        raise ConfigError(f"vLLM does not serve DoRA adapters (use_dora=true): {fix}")
    if config.bias != "none":
        raise ConfigError(f"vLLM does not serve adapters that train base biases (bias={config.bias!r}): {fix}")
    if config.modules_to_save:
        raise ConfigError(f"vLLM does not serve adapters with modules_to_save ({config.modules_to_save}): {fix}")
    if config.rank_pattern or config.alpha_pattern:
        raise ConfigError(
            f"vLLM applies one rank and alpha to every module; this adapter has per-module patterns: {fix}"
        )
    init = config.init_lora_weights
    if isinstance(init, str) and (init in ("pissa", "olora") or init.startswith("pissa_niter_")):
        raise ConfigError(f"init_lora_weights={init!r} changed the base weights, which vLLM would not know: {fix}")
    if config.r > VLLM_RANKS[-1]:
        raise ConfigError(f"r={config.r} is above vLLM's largest LoRA rank ({VLLM_RANKS[-1]}): {fix}")
    return config.r


def check_targets(tuned: Any, name: str) -> list[str]:
    """Target layers must be plain linear layers; returns their leaf names."""
    from deltatune.core import inject

    leaves = set()
    for path, wrapper in inject.delta_wrappers(tuned.get_base_model()):
        if name not in wrapper.deltas:
            continue
        info = wrapper.layer_info
        if info.kind != "linear" or getattr(info, "fan_in_fan_out", False):
            what = "GPT-2 Conv1D" if getattr(info, "fan_in_fan_out", False) else f"a {info.kind} layer"
            raise ConfigError(
                f"vLLM's LoRA covers linear layers only; {path!r} is {what}. Retrain without it in target_modules, "
                "or merge the adapter (deltatune export --merge)"
            )
        leaves.add(path.rsplit(".", 1)[-1])
    return sorted(leaves)


def command(base: str, name: str, folder: Path, rank: int) -> str:
    max_rank = next(r for r in VLLM_RANKS if r >= rank)
    return (
        f"vllm serve {shlex.quote(base)} --enable-lora --lora-modules {shlex.quote(f'{name}={folder.resolve()}')} "
        f"--max-lora-rank {max_rank}"
    )


def export_for_vllm(ns: Any, load: Any) -> int:
    """The `deltatune export --for vllm` command (`load` is the CLI's model + adapter loader)."""
    import os
    import shutil
    import warnings

    from deltatune.io.peft_format import read_config
    from deltatune.models import resolve_model
    from deltatune.train.outdir import check_replaceable, mark_written, replace_folder

    if getattr(ns, "merge", False):
        raise ConfigError("--for vllm writes the adapter for vLLM's LoRA serving; drop --merge")
    if getattr(ns, "to", "hf") != "hf":
        raise ConfigError("--for vllm writes a PEFT folder; drop --to")
    out = Path(ns.output_dir)
    check_replaceable(out, overwrite=ns.overwrite)
    rank = check_config(read_config(ns.adapter))  # before any weights load
    model, _ = load(ns, adapter=ns.adapter)  # strict: keys, shapes, finite values
    leaves = check_targets(model, model.active_adapter)
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in VLLM_LORA_FAMILIES:
        warnings.warn(
            f"vLLM's LoRA support for model_type {family!r} is not known to this check; the folder is written, "
            "check vLLM's supported-models table (column LoRA) before relying on it",
            stacklevel=2,
        )
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    source, _ = resolve_model(ns.model, trust_remote_code=ns.trust_remote_code)
    line = command(str(source), out.name, out, rank)
    try:
        model.save_pretrained(tmp)
        (tmp / "vllm-serve.sh").write_text(
            f"#!/bin/sh\n# serve this adapter with vLLM (targets: {', '.join(leaves)})\n{line}\n"
        )
        mark_written(tmp, "adapter")
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote a vLLM-ready LoRA adapter to {out} (r={rank}, targets {', '.join(leaves)}); serve it with:")
    print(f"  {line}")
    print(f"  then request model={out.name!r} (POST /v1/chat/completions), as with `deltatune serve`")
    return 0

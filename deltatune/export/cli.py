"""The `deltatune export` flags this package adds, and the steps run_export calls.

deltatune export --adapter A --output-dir D --to gguf [--gguf-type q8_0] [--ollama]
deltatune export --adapter A --output-dir D --to gguf-lora [--ollama]
deltatune export --adapter A --output-dir D [--merge | --to gguf] --push-to-hub me/name [--hub modelscope] [--private] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deltatune.export.gguf_arch import GGUF_TYPES, ExportError
from deltatune.export.hub import HUBS

TARGETS = ("hf", "gguf", "gguf-lora")


def add_export_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of `deltatune export` for GGUF, Ollama and hub upload."""
    parser.add_argument(
        "--to", choices=TARGETS, default="hf",
        help="hf: transformers folder / PEFT adapter (default); gguf: merged model as one GGUF file for "
        "llama.cpp / Ollama / LM Studio; gguf-lora: the LoRA adapter alone as llama.cpp's LoRA GGUF",
    )  # fmt: skip
    parser.add_argument(
        "--gguf-type", choices=GGUF_TYPES, default=None,
        help="tensor type of the GGUF's matrices (default f16 for --to gguf, f32 for --to gguf-lora); norms stay f32",
    )  # fmt: skip
    parser.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile beside the GGUF")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the exported folder (with a model card) to REPO")
    parser.add_argument(
        "--hub", choices=HUBS, default=None,
        help="huggingface (default) or modelscope: where --push-to-hub uploads and where a hub --model is downloaded from",
    )  # fmt: skip
    parser.add_argument("--private", action="store_true", help="create the hub repository as private")
    parser.add_argument(
        "--dry-run", action="store_true", help="with --push-to-hub: list what would be uploaded, send nothing"
    )


def add_download_hub_flag(parser: argparse.ArgumentParser) -> None:
    """`--hub` for commands that only download (infer, eval)."""
    parser.add_argument(
        "--hub", choices=HUBS, default=None,
        help="huggingface (default) or modelscope: where a hub --model is downloaded from (like DELTATUNE_HUB=ms)",
    )  # fmt: skip


def check_flags(ns: argparse.Namespace) -> None:
    """Flag combinations that cannot work, refused before any model loads."""
    to = getattr(ns, "to", "hf")
    if to == "gguf-lora" and getattr(ns, "merge", False):
        raise ExportError("--to gguf-lora writes the adapter alone; drop --merge (or use --to gguf for a merged GGUF)")
    if getattr(ns, "ollama", False) and to == "hf":
        raise ExportError("--ollama needs a GGUF: add --to gguf (or --to gguf-lora)")
    if getattr(ns, "gguf_type", None) and to == "hf":
        raise ExportError("--gguf-type applies to --to gguf / gguf-lora only")
    if (getattr(ns, "private", False) or getattr(ns, "dry_run", False)) and not getattr(ns, "push_to_hub", None):
        raise ExportError("--private and --dry-run apply to --push-to-hub only")
    if getattr(ns, "push_to_hub", None):
        from deltatune.export.hub import check_repo_id

        check_repo_id(ns.push_to_hub)


def write_gguf_export(ns: argparse.Namespace, model: Any, tokenizer: Any, folder: Path) -> str:
    """Write the GGUF (and Modelfile) into `folder`; returns what was written, for the summary line.

    `model` is merged for --to gguf, the TunedModel for --to gguf-lora."""
    from deltatune.export.gguf_lora import write_lora_gguf
    from deltatune.export.gguf_model import write_gguf
    from deltatune.export.ollama import write_modelfile

    folder.mkdir(parents=True, exist_ok=True)
    name = Path(str(ns.adapter)).parent.name if ns.adapter else None
    if ns.to == "gguf":
        gguf_type = ns.gguf_type or "f16"
        report = write_gguf(model, tokenizer, folder / f"model-{gguf_type}.gguf", gguf_type=gguf_type, name=name)
        if ns.ollama:
            write_modelfile(folder, report.path.name, tokenizer)
        return f"GGUF ({report.architecture}, {report.tensors} tensors, {gguf_type}, tokenizer {report.tokenizer})"
    gguf_type = ns.gguf_type or "f32"
    adapter = write_lora_gguf(model, folder / f"adapter-{gguf_type}.gguf", gguf_type=gguf_type, name=name)
    if ns.ollama:  # Ollama needs the base model too: ADAPTER applies on top of FROM
        base = write_gguf(model.unload(), tokenizer, folder / "base-f16.gguf", gguf_type="f16")
        write_modelfile(folder, base.path.name, tokenizer, adapter_gguf=adapter.name)
    return "llama.cpp LoRA GGUF (llama-cli -m BASE.gguf --lora " + adapter.name + ")"


def write_card(ns: argparse.Namespace, folder: Path) -> None:
    """README.md model card for the upload, from the adapter config and its training run."""
    from deltatune.export.card import CARD_NAME, find_run, model_card
    from deltatune.export.hub import hub_model_id

    adapter_config = _read_json(Path(ns.adapter) / "adapter_config.json") if ns.adapter else None
    base = hub_model_id((adapter_config or {}).get("base_model_name_or_path") or ns.model)
    kind = {"gguf": "GGUF model", "gguf-lora": "LoRA adapter (llama.cpp GGUF)"}.get(ns.to) or (
        "Merged model" if ns.merge else "Adapter"
    )
    files = sorted({p.name for p in folder.iterdir() if not p.name.startswith(".")} | {CARD_NAME})
    text = model_card(base_model=base, adapter_config=adapter_config, what=kind, files=files, run=find_run(ns.adapter))
    (folder / CARD_NAME).write_text(text, encoding="utf-8")


def push(ns: argparse.Namespace, folder: Path) -> None:
    from deltatune.export.hub import push_folder

    plan = push_folder(folder, ns.push_to_hub, hub=ns.hub or "huggingface", private=ns.private, dry_run=ns.dry_run)
    print(plan.summary())


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

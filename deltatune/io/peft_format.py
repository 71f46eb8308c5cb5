"""Read and write adapters in peft's on-disk format.

    <dir>/adapter_config.json          peft's config (only fields peft knows)
    <dir>/adapter_model.safetensors    keys "base_model.model.<module path>.<param>", no adapter name;
                                       tensors held outside the model (peft's prompt learning
                                       "prompt_embeddings") are stored under their bare, dot-free key;
                                       tensors peft keeps once per adapter at model level (VeRA's
                                       projections) under "base_model.<name>"
    <dir>/deltatune_config.json        our extra fields (peft ignores unknown files), and where the adapter
                                       came from: base fingerprint, chat template hash, sha256 of the
                                       weights (deltatune.io.provenance)

Only safetensors is ever read: a directory holding only adapter_model.bin is refused with a hint.
Files are written to temporary names, fsynced, then renamed into place (weights first, config
last), so a crash never leaves a config pointing at half-written weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import spec_for_saved
from deltatune.io.provenance import SIDECAR_KEYS

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SIDECAR_NAME = "deltatune_config.json"
KEY_PREFIX = "base_model.model."
MODEL_LEVEL_KEY = re.compile(r"base_model\.[^.]+")
"""A tensor peft keeps once per adapter beside the model (VeRA's "base_model.vera_A"): read and written as is."""


class AdapterFileError(ValueError):
    """An adapter directory or file is missing, unreadable or inconsistent; the message says which."""


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")

    _atomic_write(path, write)


def write_adapter(
    directory: str | os.PathLike,
    config: TunerConfig,
    tensors: dict[str, torch.Tensor],
    bare_keys: Collection[str] = (),
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write one adapter. `tensors` are keyed by module path relative to the base model, except `bare_keys`
    (dot-free names of tensors held outside the model), which are written as they are. `provenance`
    (base fingerprint, chat template hash) goes to the sidecar with the weights' sha256."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    assert not any("." in key for key in bare_keys), f"bare keys must not contain '.': {sorted(bare_keys)}"
    as_is = set(bare_keys) | {key for key in tensors if MODEL_LEVEL_KEY.fullmatch(key)}
    payload = {
        (key if key in as_is else KEY_PREFIX + key): value.detach().to("cpu").contiguous()
        for key, value in tensors.items()
    }
    peft_dict, sidecar = config.to_peft_dict()
    from deltatune import __version__

    sidecar["deltatune_version"] = __version__
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(payload, tmp, metadata={"format": "pt"}))
    sidecar.update({k: v for k, v in (provenance or {}).items() if v is not None})
    sidecar["sha256"] = {WEIGHTS_NAME: _sha256(out / WEIGHTS_NAME)}
    _write_json(out / SIDECAR_NAME, sidecar)
    _write_json(out / CONFIG_NAME, peft_dict)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_provenance(directory: str | os.PathLike) -> dict[str, Any]:
    """The sidecar's provenance fields ({} for peft's files and older ones)."""
    path = Path(directory) / SIDECAR_NAME
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return {}
    return {k: sidecar[k] for k in SIDECAR_KEYS if isinstance(sidecar, dict) and k in sidecar}


def read_config(directory: str | os.PathLike) -> TunerConfig:
    """Parse and validate an adapter's config (before any tensor is read)."""
    path = Path(directory)
    config_path = path / CONFIG_NAME
    if not path.is_dir():
        raise AdapterFileError(f"adapter directory {str(path)!r} does not exist")
    if not config_path.is_file():
        present = sorted(p.name for p in path.iterdir())[:20]
        inside = sorted((p for p in path.iterdir() if (p / CONFIG_NAME).is_file()), key=lambda p: p.name != "adapter")
        hint = f"did you mean {inside[0]}? " if inside else ""  # e.g. a `deltatune sft` run folder
        raise AdapterFileError(
            f"{config_path} is missing: an adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME} "
            f"(found: {present}). {hint}Point at the folder save_pretrained() wrote."
        )
    try:
        data = json.loads(config_path.read_text(encoding="utf-8-sig"))  # a leading BOM is accepted
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{config_path}: expected a JSON object")
    sidecar_path = path / SIDECAR_NAME
    if sidecar_path.is_file():
        try:
            sidecar = json.loads(sidecar_path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterFileError(f"{sidecar_path} is not valid JSON: {exc}") from None
        sidecar.pop("deltatune_version", None)
        for key in SIDECAR_KEYS:
            sidecar.pop(key, None)
        data = {**data, **sidecar}
    spec = spec_for_saved(data, str(config_path))
    try:
        return spec.config.from_dict(data, source=str(config_path))
    except ConfigError:
        raise
    except TypeError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None


def read_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read adapter tensors (keys without the base_model.model. prefix), checking each one."""
    path = Path(directory)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        hint = ""
        if (path / "adapter_model.bin").is_file():
            hint = (
                " Only adapter_model.bin (a pickle) is there; deltatune never unpickles files. Convert it once, "
                "in an environment you trust, to safetensors."
            )
        raise AdapterFileError(f"{weights} is missing.{hint}")
    try:
        raw = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    tensors: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        # a tensor held outside the model: peft's "prompt_embeddings", or a model-level "base_model.vera_A"
        bare = "." not in key or MODEL_LEVEL_KEY.fullmatch(key) is not None
        if not key.startswith(KEY_PREFIX) and not bare:
            raise AdapterFileError(f"{weights}: key {key!r} lacks the {KEY_PREFIX!r} prefix of the peft format")
        if value.numel() == 0:
            raise AdapterFileError(f"{weights}: tensor {key!r} is empty (shape {tuple(value.shape)})")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise AdapterFileError(f"{weights}: tensor {key!r} holds NaN or infinite values")
        tensors[key if bare else key[len(KEY_PREFIX) :]] = value
    return tensors


def verify_weights(directory: str | os.PathLike) -> None:
    """Check the weights file against the sha256 the sidecar recorded (no-op when none is recorded).

    Called once the tensors passed every specific check (readable, finite, the right keys and shapes),
    so those name the problem first; this catches what they cannot, such as a flipped bit.

    Raises:
        AdapterFileError: the file's sha256 differs from the recorded one.
    """
    path = Path(directory)
    expected = (read_provenance(path).get("sha256") or {}).get(WEIGHTS_NAME)
    if isinstance(expected, str) and _sha256(path / WEIGHTS_NAME) != expected:
        raise AdapterFileError(
            f"{path / WEIGHTS_NAME} does not match the sha256 recorded in {SIDECAR_NAME} (corrupted: a changed or "
            f"flipped byte); restore the file from a good copy. If another tool rewrote the weights on purpose, "
            f"delete {SIDECAR_NAME}"
        )


def read_adapter(directory: str | os.PathLike) -> tuple[TunerConfig, dict[str, torch.Tensor]]:
    config = read_config(directory)
    return config, read_tensors(directory)

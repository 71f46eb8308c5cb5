"""Atomic, verified, pickle-free checkpoints.

Layout of `OUT/checkpoints/step-N/`:

    adapter/                   PEFT-format adapter (adapter_config.json + adapter_model.safetensors)
    optimizer.safetensors      every optimizer state tensor, keyed "<param index>.<name>"
    optimizer.json             param groups, the trainable parameter names, non-tensor state
    trainer_state.json         step, data cursor, schedule, RNG states (JSON/base64), scaler
    train_args.json            the run's arguments and its structural fingerprint
    manifest.json              written LAST: size + sha256 of every file above, step, config hash,
                               data fingerprint, library versions

A checkpoint is written into `.tmp-step-N-<pid>/`, every file fsynced, the manifest written and
fsynced, then the folder is renamed into place and the parent fsynced. A folder without a
manifest whose hashes match is not a checkpoint: `find_latest` skips it. Older checkpoints are
deleted only after the new one is complete.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltatune.train.errors import ResumeError, SaveError, write_failure

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d+)")


# -- files ------------------------------------------------------------------------------------
def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    import accelerate
    import safetensors
    import transformers

    import deltatune

    return {
        "deltatune": deltatune.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "safetensors": safetensors.__version__,
    }


# -- RNG and optimizer state as JSON + safetensors --------------------------------------------
def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch generator states, JSON-ready."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


def optimizer_to_files(
    optimizer: torch.optim.Optimizer, param_names: list[str]
) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into (tensors, JSON). Param indices follow param_names."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "param_names": param_names, "scalars": scalars}


def optimizer_from_files(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, param_names: list[str]
) -> None:
    if meta["param_names"] != param_names:
        raise ResumeError("the checkpoint's optimizer holds different trainable tensors than this model; start over")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# -- write / verify / find ----------------------------------------------------------------------
def write_manifest(folder: Path, meta: dict[str, Any]) -> None:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        fsync_file(path)
        files[rel] = {"size": path.stat().st_size, "sha256": sha256(path)}
    for sub in sorted({p.parent for p in folder.rglob("*")}):
        fsync_dir(sub)
    manifest = {"format": FORMAT_VERSION, "files": files, "versions": versions(), **meta}
    write_json(folder / MANIFEST, manifest)
    fsync_file(folder / MANIFEST)
    fsync_dir(folder)


def verify(folder: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint whose files all match it.

    Raises:
        ResumeError: missing/unreadable manifest, missing file, size or sha256 mismatch.
    """
    path = folder / MANIFEST
    if not path.is_file():
        raise ResumeError(f"{folder} has no manifest (an interrupted save)")
    try:
        manifest = read_json(path)
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise ResumeError(f"{path} is unreadable: {err}") from None
    for rel, expect in files.items():
        target = folder / rel
        if not target.is_file():
            raise ResumeError(f"{folder}: file {rel} listed in the manifest is missing")
        if target.stat().st_size != expect["size"] or sha256(target) != expect["sha256"]:
            raise ResumeError(f"{folder}: file {rel} does not match its sha256 in the manifest (corrupted)")
    return manifest


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-N folder, newest first."""
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.fullmatch(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
    return sorted(found, reverse=True)


def find_latest(root: Path, *, log=print) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint with a valid manifest (invalid ones are reported and skipped)."""
    for _, folder in checkpoint_dirs(root):
        try:
            return folder, verify(folder)
        except ResumeError as err:
            log(f"skipping checkpoint: {err}")
    return None


def save_checkpoint(root: Path, step: int, write_files, meta: dict[str, Any], *, keep: int) -> Path:
    """Write a checkpoint atomically; `write_files(folder)` writes everything but the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        try:
            write_files(tmp)
            write_manifest(tmp, {"step": step, **meta})
        except (OSError, SafetensorError) as err:
            why, code = write_failure(err)
            raise SaveError(
                f"could not write checkpoint {final.name} in {root}: {why}; free disk space and continue with "
                "--resume (the checkpoints already there are intact)",
                code,
            ) from err
        if final.exists():  # same step saved before (a resumed run re-saving): replace it
            old = root / f".old-step-{step}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    verify(final)  # re-open what we saved
    for _, old in checkpoint_dirs(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temps(root: Path) -> None:
    """Delete half-written checkpoint folders left by a killed run."""
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith((".tmp-step-", ".old-step-")) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))

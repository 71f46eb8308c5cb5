"""Models from the ModelScope hub, beside Hugging Face ids and local folders.

A model name goes to ModelScope when the user asks for it: an `ms://owner/name` or
`modelscope://owner/name` prefix, `--hub modelscope` (environment: `DELTATUNE_HUB=ms`), or a
registry entry published on ModelScope only. The files are fetched with the `modelscope` SDK's
`snapshot_download` into `$DELTATUNE_CACHE/modelscope/` and the folder is loaded like any local one.

What is fetched is what loads without running code: JSON configs, safetensors weights and tokenizer
files. `.bin`/`.pt` pickles are never downloaded, and neither are `.py` files unless the caller
passed trust_remote_code; a folder that still maps to custom code is refused by
deltatune.models.registry.check_remote_code before anything is imported.

Offline (`DELTATUNE_OFFLINE=1`, `HF_HUB_OFFLINE=1` or `MODELSCOPE_OFFLINE=1`) only the local cache
is used; online, a hub that cannot be reached falls back to a cached copy when there is one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from deltatune.assets import cache_root

MS_PREFIXES = ("ms://", "modelscope://")
_MS_NAMES = ("ms", "modelscope")
_SAFE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.md"]
_OFFLINE_ENV = ("DELTATUNE_OFFLINE", "HF_HUB_OFFLINE", "MODELSCOPE_OFFLINE")


def wants_modelscope(hub: str | None = None) -> bool:
    """True when the caller (or DELTATUNE_HUB) chose ModelScope."""
    chosen = (hub or os.environ.get("DELTATUNE_HUB") or "").strip().lower()
    return chosen in _MS_NAMES


def modelscope_id(name: str) -> str | None:
    """`owner/name` for an `ms://` / `modelscope://` name, else None."""
    for prefix in MS_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return None


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_ENV)


def download_model(repo_id: str, *, trust_remote_code: bool = False, revision: str | None = None, log=print) -> Path:
    """A local folder holding ModelScope model `repo_id` (downloaded, or from the cache).

    Raises:
        ModelError: a malformed id, the SDK missing, offline without a cached copy, or the hub
            unreachable / refusing with no cached copy.
    """
    from deltatune.models.registry import ModelError

    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")) or ".." in repo_id:
        raise ModelError(f"ModelScope model id must be 'owner/name', got {repo_id!r}")
    patterns = _SAFE_PATTERNS + (["*.py"] if trust_remote_code else [])
    folder = _fetch(repo_id, "model", patterns, revision, ModelError, log)
    return _checked(folder, repo_id)


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def download_dataset(spec_name: str, *, revision: str | None = None, offline: bool | None = None, log=print) -> Path:
    """`ms://owner/name` (the repo's one data file, or its one `*train*` file) or
    `ms://owner/name/path/file.jsonl` -> the local data file, downloaded or from the cache.

    Raises:
        DataError: a malformed name, the SDK missing, offline or unreachable without a cached copy,
            or a repository whose data file is ambiguous (the message lists them).
    """
    from deltatune.data.report import DataError

    rest = modelscope_id(spec_name) or spec_name
    parts = rest.split("/")
    if len(parts) < 2 or not all(parts) or ".." in parts:
        raise DataError(f"ModelScope data set must be ms://owner/name[/file], got {spec_name!r}")
    repo_id, inner = "/".join(parts[:2]), "/".join(parts[2:]) or None
    patterns = [inner] if inner else [f"*{suffix}" for suffix in DATA_SUFFIXES]
    folder = _fetch(repo_id, "dataset", patterns, revision, DataError, log, offline)
    if inner:
        if not (folder / inner).is_file():
            raise DataError(f"ModelScope data set {repo_id!r} has no file {inner!r}")
        return folder / inner
    files = sorted(p for p in folder.rglob("*") if p.suffix in DATA_SUFFIXES and not p.name.startswith("dataset_info"))
    chosen = files if len(files) == 1 else [p for p in files if "train" in p.name]
    if len(chosen) != 1:
        names = ", ".join(p.relative_to(folder).as_posix() for p in files[:10]) or "none"
        raise DataError(
            f"ModelScope data set {repo_id!r} holds {len(files)} data files ({names}); name one: ms://{repo_id}/FILE"
        )
    return chosen[0]


def _fetch(
    repo_id: str,
    repo_type: str,
    patterns: list[str],
    revision: str | None,
    error: type,
    log,
    offline: bool | None = None,
) -> Path:
    """snapshot_download with deltatune's offline rules; failures raise `error` (one line)."""
    if importlib.util.find_spec("modelscope") is None:
        raise error(
            f"{repo_id!r} comes from ModelScope, which needs its SDK: pip install 'deltatune[hub]' (or pip install modelscope)"
        )
    from modelscope import snapshot_download

    cache = cache_root() / "modelscope"
    endpoint = os.environ.get("MODELSCOPE_ENDPOINT") or None  # read now: the SDK caches it at import
    kwargs = dict(
        repo_type=repo_type, revision=revision, cache_dir=str(cache), allow_patterns=patterns, endpoint=endpoint
    )
    logging.getLogger("modelscope_hub").setLevel(logging.WARNING)

    def cached() -> Path:
        folder = Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
        if not folder.is_dir() or not any(folder.iterdir()):
            raise FileNotFoundError(folder)
        return folder

    if _offline() if offline is None else offline:
        try:
            return cached()
        except Exception:  # noqa: BLE001
            raise error(
                f"{repo_type} {repo_id!r} is not in the ModelScope cache ({cache}) and this run is offline; unset "
                "DELTATUNE_OFFLINE / HF_HUB_OFFLINE / MODELSCOPE_OFFLINE to download it, or use a local folder or file"
            ) from None
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except Exception as err:  # noqa: BLE001 - unreachable, refused, not found: try the cache, else say so
        reason = _first_line(err)
    try:
        folder = cached()
    except Exception:  # noqa: BLE001
        raise error(
            f"could not download {repo_type} {repo_id!r} from ModelScope: {reason}; offline, use a local folder or "
            "file, or a registry entry that is available offline"
        ) from None
    log(f"ModelScope unreachable ({reason}); using the cached copy of {repo_id} in {folder}")
    return folder


def _checked(folder: Path, repo_id: str) -> Path:
    from deltatune.models.registry import ModelError

    if not (folder / "config.json").is_file():
        raise ModelError(f"ModelScope repo {repo_id!r} has no config.json; it is not a transformers model")
    if not any(folder.rglob("*.safetensors")):
        raise ModelError(
            f"ModelScope repo {repo_id!r} has no safetensors weights (only pickled .bin/.pt files, which deltatune "
            "never loads); convert them to safetensors in an environment you trust, or pick another repository"
        )
    return folder


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__

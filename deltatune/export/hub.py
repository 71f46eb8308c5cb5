"""Upload an export folder (adapter, merged model or GGUF) to the Hugging Face hub or ModelScope.

    push_folder("runs/demo-gguf", "me/smollm2-chatterbot", hub="huggingface", private=True)

Hugging Face goes through `huggingface_hub.HfApi` (create_repo, then upload_folder: one commit);
ModelScope through the `modelscope` SDK's HubApi (create_repo, upload_folder). Endpoints are the
clients' own settings (`HF_ENDPOINT`, `MODELSCOPE_ENDPOINT`), which is also how the tests point them
at local servers.

Tokens: Hugging Face's comes from `HF_TOKEN` or `hf auth login` (huggingface_hub reads both);
ModelScope's from `MODELSCOPE_API_TOKEN` or the SDK's saved login. deltatune only ever holds the
token in memory: it never logs it, never writes it (we do not call the SDKs' `login`, which saves
credentials), and the folder uploaded is the export folder, which holds no token. A missing token
is an error before anything is sent. `dry_run` lists what would be uploaded and sends nothing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from deltatune.core.config import ConfigError

HUBS = ("huggingface", "modelscope")
_HIDDEN = [".*", "*/.*", "**/.*"]  # the export marker, locks, temporary files: never uploaded
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class HubError(ConfigError):
    """An upload or download cannot go ahead (no token, bad repo id, hub unreachable); the message says why."""


@dataclass
class UploadPlan:
    """What an upload sends (or, in a dry run, would send)."""

    hub: str
    repo_id: str
    private: bool
    files: list[tuple[str, int]] = field(default_factory=list)
    """(path in the repository, bytes)."""
    url: str | None = None
    dry_run: bool = False

    def summary(self) -> str:
        total = sum(size for _, size in self.files)
        head = "would upload" if self.dry_run else "uploaded"
        lines = [f"{head} {len(self.files)} files ({total / 2**20:.1f} MiB) to {self.hub} repo {self.repo_id} "
                 f"({'private' if self.private else 'public'})" + (f": {self.url}" if self.url else "")]  # fmt: skip
        lines += [f"  {path}  ({size:,d} bytes)" for path, size in self.files]
        return "\n".join(lines)


def check_repo_id(repo_id: str) -> None:
    if not _REPO_ID.match(repo_id or ""):
        raise HubError(
            f"--push-to-hub needs a repository id 'owner/name' (letters, digits, '.', '_', '-'), got {repo_id!r}"
        )


def list_upload(folder: str | Path) -> list[tuple[str, int]]:
    """Files an upload of `folder` sends: everything but hidden files (locks, temporary files)."""
    root = Path(folder)
    return sorted(
        (p.relative_to(root).as_posix(), p.stat().st_size)
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    hub: str = "huggingface",
    private: bool = False,
    dry_run: bool = False,
    commit_message: str = "Upload with deltatune",
) -> UploadPlan:
    """Create `repo_id` if needed (private when asked) and upload `folder` in one commit.

    Raises:
        HubError: unknown hub, bad repo id, no token, a missing SDK, or the hub refused / was unreachable.
    """
    if hub not in HUBS:
        raise HubError(f"--hub must be one of {', '.join(HUBS)}, got {hub!r}")
    check_repo_id(repo_id)
    plan = UploadPlan(hub, repo_id, private, list_upload(folder), dry_run=dry_run)
    if not plan.files:
        raise HubError(f"{folder} has no files to upload")
    if dry_run:
        return plan
    if hub == "huggingface":
        plan.url = _push_huggingface(Path(folder), repo_id, private, commit_message)
    else:
        plan.url = _push_modelscope(Path(folder), repo_id, private, commit_message)
    return plan


def _push_huggingface(folder: Path, repo_id: str, private: bool, message: str) -> str:
    from huggingface_hub import HfApi, get_token

    if not get_token():
        raise HubError("no Hugging Face token: set HF_TOKEN in the environment or run `hf auth login`, then retry")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)  # read now, not at import
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message, ignore_patterns=_HIDDEN
        )
    except Exception as err:  # noqa: BLE001 - any client/HTTP failure becomes one line
        raise HubError(f"upload to Hugging Face repo {repo_id} failed: {_first_line(err, get_token())}") from None
    return str(getattr(info, "commit_url", "") or f"{api.endpoint}/{repo_id}")


def modelscope_token() -> str | None:
    """MODELSCOPE_API_TOKEN, else the modelscope SDK's saved login (read, never written)."""
    token = os.environ.get("MODELSCOPE_API_TOKEN")
    if token:
        return token
    try:
        from modelscope.hub.api import ModelScopeConfig

        return (
            ModelScopeConfig.get_git_token()
            if hasattr(ModelScopeConfig, "get_git_token")
            else ModelScopeConfig.get_token()
        )
    except Exception:  # noqa: BLE001 - no SDK or no saved login: no token
        return None


def _require_modelscope() -> None:
    import importlib.util

    if importlib.util.find_spec("modelscope") is None:
        raise HubError("ModelScope needs its SDK: pip install 'deltatune[hub]' (or pip install modelscope)")


def _push_modelscope(folder: Path, repo_id: str, private: bool, message: str) -> str:
    _require_modelscope()
    token = modelscope_token()
    if not token:
        raise HubError(
            "no ModelScope token: set MODELSCOPE_API_TOKEN in the environment (or log in with the modelscope SDK), then retry"
        )
    from modelscope.hub.api import HubApi

    api = HubApi(endpoint=os.environ.get("MODELSCOPE_ENDPOINT") or None)  # read now, not at import
    try:
        api.create_repo(repo_id, token=token, visibility="private" if private else "public", exist_ok=True)
        # use_cache=False: the SDK would otherwise keep resume state in a folder inside the export
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=message,
            token=token,
            use_cache=False,
            ignore_patterns=_HIDDEN,
        )
    except Exception as err:  # noqa: BLE001 - any client/HTTP failure becomes one line
        raise HubError(f"upload to ModelScope repo {repo_id} failed: {_first_line(err, token)}") from None
    return f"{getattr(api, 'endpoint', '') or 'https://www.modelscope.cn'}/models/{repo_id}"


def _first_line(err: Exception, secret: str | None = None) -> str:
    text = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return text.replace(secret, "***") if secret else text


def push_adapter(
    tuned,
    repo_id: str,
    *,
    hub: str = "huggingface",
    private: bool = False,
    dry_run: bool = False,
    commit_message: str = "Upload adapter with deltatune",
) -> UploadPlan:
    """TunedModel.push_to_hub: save the adapters (PEFT format) and a model card into a temporary
    folder and upload it (see push_folder)."""
    import tempfile

    from deltatune.export.card import CARD_NAME, model_card

    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="deltatune-push-") as tmp:
        tuned.save_pretrained(tmp)
        config = tuned.peft_config[tuned.active_adapters[0]] if tuned.active_adapters else None
        peft_dict = config.to_peft_dict()[0] if config is not None else None
        base = (peft_dict or {}).get("base_model_name_or_path")
        files = sorted({p.name for p in Path(tmp).iterdir()} | {CARD_NAME})
        card = model_card(base_model=hub_model_id(base), adapter_config=peft_dict, what="Adapter", files=files)
        (Path(tmp) / CARD_NAME).write_text(card, encoding="utf-8")
        return push_folder(tmp, repo_id, hub=hub, private=private, dry_run=dry_run, commit_message=commit_message)


def hub_model_id(name: str | None) -> str | None:
    if not name:
        return None
    from deltatune.models.registry import get_model_spec, spec_for_source

    spec = get_model_spec(name) or spec_for_source(name)
    if spec is not None:
        return spec.hf_id or spec.ms_id
    if Path(name).expanduser().exists() or name.count("/") != 1 or name.startswith((".", "/")):
        return None
    return name

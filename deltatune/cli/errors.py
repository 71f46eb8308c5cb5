"""Exit statuses of the `deltatune` command: one per kind of problem, so scripts can branch.

| status | meaning |
|---|---|
| 0 | success |
| 1 | unexpected internal error (a bug: rerun with --debug and report it) |
| 2 | command-line usage (argparse) |
| 3 | nothing to do (resumed run already at max_steps) |
| 4 | invalid configuration (flags, --config file, --tuner-args) |
| 5 | invalid data |
| 6 | model cannot be found or loaded |
| 7 | output folder in the way or locked |
| 8 | resume / checkpoint problem |
| 9 | training stopped: non-finite loss, or a tensor got no gradient |
| 10 | interrupted (SIGTERM/SIGINT); a checkpoint was saved |
| 11 | adapter files do not fit the model |
| 12 | file system error (disk full, permissions); files already in place are left intact |
| 13 | merge refused: the merged weights would hold NaN/inf, or the merge cannot be undone; the base is unchanged |
| 14 | refused as unsafe: a chat template tried to leave Jinja's sandbox (a template that is merely broken: 6) |
| 15 | out of memory (accelerator or host) |

Data errors print their whole per-reason report (file:line(:byte) locations); every other error
prints one line naming the file or step and the fix.
"""

from __future__ import annotations

import errno

import torch
from jinja2.exceptions import SecurityError, TemplateError
from safetensors import SafetensorError

from deltatune.assets import AssetError
from deltatune.core.config import ConfigError
from deltatune.core.tuned_model import AdapterLoadError
from deltatune.core.wrapper import MergeError
from deltatune.data import DataError
from deltatune.io import AdapterFileError
from deltatune.models import ModelError
from deltatune.train.errors import (
    DivergedError,
    GradientCheckError,
    Interrupted,
    NothingToDo,
    OutputDirError,
    ResumeError,
)

OK, INTERNAL, USAGE = 0, 1, 2
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: cuda only
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (NothingToDo, 3),
    (ConfigError, 4),
    (DataError, 5),
    (ModelError, 6),
    (AssetError, 6),
    (OutputDirError, 7),
    (ResumeError, 8),
    (DivergedError, 9),
    (GradientCheckError, 9),
    (Interrupted, 10),
    (AdapterLoadError, 11),
    (AdapterFileError, 11),
    (OSError, 12),
    (SafetensorError, 12),
    (MergeError, 13),
    (SecurityError, 14),
    (TemplateError, 6),
    (_OUT_OF_MEMORY, 15),
    (MemoryError, 15),
]


def exit_code(err: BaseException) -> int | None:
    """The status for a known error, None for an unexpected one."""
    for kind, code in EXIT_CODES:
        if isinstance(err, kind):
            return code
    return None


def describe(err: BaseException) -> str:
    """What `deltatune` prints for a known error: one line (a data error: its whole report)."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    if isinstance(err, DataError):
        return text or first  # the per-reason counts and locations follow the first line
    if isinstance(err, MergeError):
        return f"merge refused: {first}; the base weights are unchanged. Use the adapter unmerged (drop --merge)"
    if isinstance(err, SecurityError):
        return (
            f"chat template refused by Jinja's sandbox ({first}); the model's chat template (tokenizer_config.json "
            "or chat_template.jinja) reaches for Python internals: replace it with a plain template"
        )
    if isinstance(err, TemplateError):
        return (
            f"the chat template cannot be rendered ({first}); fix the model's chat template (tokenizer_config.json "
            "or chat_template.jinja)"
        )
    if isinstance(err, (_OUT_OF_MEMORY, MemoryError)):
        return (
            f"out of memory ({first or 'MemoryError'}); lower --batch-size or --max-length, or use "
            "--gradient-checkpointing, --dtype bf16 or --quantize 4bit"
        )
    if isinstance(err, SafetensorError):
        space = "StorageFull" in text or "No space" in text
        why = "the disk is full" if space else first
        return f"could not write a safetensors file: {why}; free disk space and rerun (a run: with --resume)"
    if isinstance(err, OSError) and err.errno is not None and text.startswith("["):
        fix = {
            errno.ENOSPC: "free disk space",
            errno.EDQUOT: "free disk space (quota exceeded)",
            errno.EACCES: "fix the permissions",
            errno.EPERM: "fix the permissions",
            errno.EROFS: "write somewhere writable",
        }.get(err.errno, "fix the file system problem")
        name = f": {err.filename}" if err.filename else ""
        return f"{err.strerror}{name}; {fix} and rerun (a run: with --resume); files already in place are intact"
    return first

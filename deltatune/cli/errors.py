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
"""

from __future__ import annotations

from deltatune.assets import AssetError
from deltatune.core.config import ConfigError
from deltatune.core.tuned_model import AdapterLoadError
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
]


def exit_code(err: BaseException) -> int | None:
    """The status for a known error, None for an unexpected one."""
    for kind, code in EXIT_CODES:
        if isinstance(err, kind):
            return code
    return None

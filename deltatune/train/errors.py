"""Errors the training loop raises; each maps to its own CLI exit status (deltatune.cli.errors)."""

from __future__ import annotations

import errno


class TrainError(RuntimeError):
    """Base of training errors; the message is one line naming the problem and the fix."""


class OutputDirError(TrainError):
    """The output directory is non-empty without --resume/--overwrite, or locked by another run."""


class ResumeError(TrainError):
    """No usable checkpoint, a corrupted one, or a structural config change on resume."""


class NothingToDo(TrainError):
    """The run being resumed already reached max_steps."""


class DivergedError(TrainError):
    """Repeated non-finite loss or gradients; no NaN state was checkpointed."""


class GradientCheckError(TrainError):
    """A trainable tensor got no finite, non-zero gradient in the first steps."""


class Interrupted(TrainError):
    """SIGTERM/SIGINT: a checkpoint was written, resume with --resume."""


class SaveError(OSError):
    """Writing a checkpoint or the run's final outputs failed (disk full, permissions); files
    already in place are intact. An OSError, so it shares the file-system exit status."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(code or errno.EIO, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def write_failure(err: BaseException) -> tuple[str, int]:
    """(short reason, errno) of a failed write: an OSError, or safetensors' error (which carries
    the OS error only in its text)."""
    if isinstance(err, OSError) and err.errno is not None:
        return (err.strerror or str(err)), err.errno
    text = str(err)
    if "StorageFull" in text or "No space" in text or "code: 28" in text:
        return "no space left on device", errno.ENOSPC
    return (text.splitlines()[0] if text else type(err).__name__), errno.EIO

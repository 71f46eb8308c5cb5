"""Errors the training loop raises; each maps to its own CLI exit status (deltatune.cli.errors)."""

from __future__ import annotations


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

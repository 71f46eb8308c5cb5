"""Training: `train(TrainArgs(...))`, one loop on accelerate with exact, pickle-free resume."""

from deltatune.train.args import TrainArgs
from deltatune.train.errors import (
    DivergedError,
    GradientCheckError,
    Interrupted,
    NothingToDo,
    OutputDirError,
    ResumeError,
    TrainError,
)
from deltatune.train.loop import TrainResult, train

__all__ = [
    "DivergedError",
    "GradientCheckError",
    "Interrupted",
    "NothingToDo",
    "OutputDirError",
    "ResumeError",
    "TrainArgs",
    "TrainError",
    "TrainResult",
    "train",
]

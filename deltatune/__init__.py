"""deltatune: parameter-efficient fine-tuning for PyTorch models, peft-format compatible."""

__version__ = "0.1.0"

from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec, all_specs, get_spec, register
from deltatune.core.tuned_model import AdapterLoadError, TunedModel, get_tuned_model
from deltatune.core.wrapper import MergeError
from deltatune.io import AdapterFileError
from deltatune.tuners.lora import LoraConfig

__all__ = [
    "AdapterFileError",
    "AdapterLoadError",
    "ConfigError",
    "LoraConfig",
    "MergeError",
    "TunedModel",
    "TunerConfig",
    "TunerSpec",
    "all_specs",
    "get_spec",
    "get_tuned_model",
    "register",
]

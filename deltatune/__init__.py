"""deltatune: parameter-efficient fine-tuning for PyTorch models, peft-format compatible."""

__version__ = "0.1.0"

from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec, all_specs, get_spec, register
from deltatune.core.tuned_model import AdapterLoadError, TunedModel, get_tuned_model
from deltatune.core.wrapper import MergeError, QuantizedMergeError
from deltatune.io import AdapterFileError
from deltatune.quantization import prepare_for_kbit_training, prepare_model_for_kbit_training
from deltatune.tuners.bitfit import BitFitConfig
from deltatune.tuners.full import FullConfig
from deltatune.tuners.ia3 import IA3Config
from deltatune.tuners.ln_tuning import LNTuningConfig
from deltatune.tuners.lora import LoraConfig
from deltatune.tuners.part import PartConfig

__all__ = [
    "AdapterFileError",
    "AdapterLoadError",
    "BitFitConfig",
    "ConfigError",
    "FullConfig",
    "IA3Config",
    "LNTuningConfig",
    "LoraConfig",
    "MergeError",
    "PartConfig",
    "QuantizedMergeError",
    "TunedModel",
    "TunerConfig",
    "TunerSpec",
    "all_specs",
    "get_spec",
    "get_tuned_model",
    "prepare_for_kbit_training",
    "prepare_model_for_kbit_training",
    "register",
]

"""deltatune: parameter-efficient fine-tuning for PyTorch models, peft-format compatible."""

__version__ = "0.1.0"

from deltatune.runtime import prefer_passive_waiting

prefer_passive_waiting()  # before torch loads OpenMP: idle threads sleep instead of spinning (deltatune/runtime.py)

from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap  # peft.utils.hotswap
from deltatune.core.peft_api import (  # peft's names
    get_base_model_state_dict,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from deltatune.core.registry import TunerSpec, all_specs, get_spec, register
from deltatune.core.tuned_model import AdapterLoadError, TunedModel, get_tuned_model
from deltatune.core.wrapper import MergeError, QuantizedMergeError
from deltatune.io import AdapterFileError
from deltatune.quantization import prepare_for_kbit_training, prepare_model_for_kbit_training
from deltatune.tuners.adapter import AdapterConfig
from deltatune.tuners.beft import BeftConfig
from deltatune.tuners.bitfit import BitFitConfig
from deltatune.tuners.boft import BOFTConfig
from deltatune.tuners.c3a import C3AConfig
from deltatune.tuners.cartridge import CartridgeConfig
from deltatune.tuners.deft import DeftConfig
from deltatune.tuners.delora import DeloraConfig
from deltatune.tuners.fourierft import FourierFTConfig
from deltatune.tuners.full import FullConfig
from deltatune.tuners.glora import GloraConfig
from deltatune.tuners.gralora import GraloraConfig
from deltatune.tuners.hira import HiraConfig
from deltatune.tuners.hra import HRAConfig
from deltatune.tuners.ia3 import IA3Config
from deltatune.tuners.llama_pro import LlamaProConfig
from deltatune.tuners.ln_tuning import LNTuningConfig
from deltatune.tuners.loha import LoHaConfig
from deltatune.tuners.lokr import LoKrConfig
from deltatune.tuners.lora import LoraConfig
from deltatune.tuners.lora_conversion import convert_to_lora  # peft's name
from deltatune.tuners.miss import MissConfig
from deltatune.tuners.oft import OFTConfig
from deltatune.tuners.p_tuning import PTuningConfig
from deltatune.tuners.part import PartConfig
from deltatune.tuners.peanut import PeanutConfig
from deltatune.tuners.prefix_tuning import PrefixTuningConfig
from deltatune.tuners.prompt_tuning import PromptTuningConfig
from deltatune.tuners.pvera import PveraConfig
from deltatune.tuners.randlora import RandLoraConfig
from deltatune.tuners.restuning import ResTuningConfig
from deltatune.tuners.road import RoadConfig
from deltatune.tuners.shira import ShiraConfig
from deltatune.tuners.side_tuning import SideTuningConfig
from deltatune.tuners.supertuning import SupertuningConfig
from deltatune.tuners.trainable_tokens import TrainableTokensConfig
from deltatune.tuners.unilora import UniLoraConfig
from deltatune.tuners.vblora import VBLoRAConfig
from deltatune.tuners.vera import VeraConfig
from deltatune.tuners.waveft import WaveFTConfig

__all__ = [
    "AdapterFileError",
    "AdapterConfig",
    "AdapterLoadError",
    "BeftConfig",
    "BOFTConfig",
    "BitFitConfig",
    "ConfigError",
    "C3AConfig",
    "CartridgeConfig",
    "DeftConfig",
    "DeloraConfig",
    "FourierFTConfig",
    "FullConfig",
    "GloraConfig",
    "GraloraConfig",
    "HiraConfig",
    "HRAConfig",
    "IA3Config",
    "LNTuningConfig",
    "LlamaProConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "MergeError",
    "MissConfig",
    "OFTConfig",
    "PartConfig",
    "PeanutConfig",
    "PTuningConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "QuantizedMergeError",
    "PveraConfig",
    "RandLoraConfig",
    "ResTuningConfig",
    "RoadConfig",
    "ShiraConfig",
    "SideTuningConfig",
    "TunedModel",
    "TrainableTokensConfig",
    "SupertuningConfig",
    "TunerConfig",
    "TunerSpec",
    "all_specs",
    "convert_to_lora",
    "get_spec",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "hotswap_adapter",
    "prepare_model_for_compiled_hotswap",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "get_tuned_model",
    "prepare_for_kbit_training",
    "prepare_model_for_kbit_training",
    "register",
    "UniLoraConfig",
    "VBLoRAConfig",
    "VeraConfig",
    "WaveFTConfig",
]

"""deltatune: parameter-efficient fine-tuning of PyTorch and transformers models.

    import deltatune as dt
    model = dt.get_delta_model(base_model, dt.LoraConfig(r=8, target_modules=["query", "value"]))
"""

from __future__ import annotations

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from . import quant
from .config import DeltaConfig, TargetedConfig, TaskType
from .errors import (
    AdapterNotFoundError,
    BaseModelMismatchError,
    CheckpointError,
    ConfigError,
    DeltaError,
    MergeError,
    TargetError,
)
from .methods.adalora import AdaLoraConfig
from .methods.bitfit import BitFitConfig
from .methods.bottleneck import BottleneckConfig
from .methods.ia3 import IA3Config
from .methods.ln_tuning import LNTuningConfig
from .methods.loha import LoHaConfig
from .methods.lokr import LoKrConfig
from .methods.lora import LoftQConfig, LoraConfig, replace_lora_weights_loftq
from .methods.oft import OFTConfig
from .methods.p_tuning import PTuningConfig
from .methods.prefix_tuning import PrefixTuningConfig
from .methods.prompt_tuning import PromptTuningConfig
from .methods.vera import VeraConfig
from .model import DeltaModel, get_delta_model
from .model_interface import register_architecture
from .peft_compat import get_peft_model_state_dict, prepare_model_for_kbit_training, set_peft_model_state_dict
from .quant import dequantize, prepare_for_kbit_training, quantize
from .registry import MethodSpec, all_methods, get_method, register

get_peft_model = get_delta_model  # the names users coming from HF peft type first
PeftModel = DeltaModel
PeftConfig = DeltaConfig

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig", "AdapterNotFoundError", "BaseModelMismatchError", "BitFitConfig", "BottleneckConfig", "CheckpointError",
    "ConfigError", "DeltaConfig", "DeltaError", "DeltaModel", "IA3Config", "LNTuningConfig", "LoHaConfig",
    "LoKrConfig", "LoftQConfig", "LoraConfig", "MergeError", "MethodSpec", "OFTConfig", "PTuningConfig", "PeftConfig", "PeftModel",
    "PrefixTuningConfig", "PromptTuningConfig", "TargetError", "TargetedConfig", "TaskType", "VeraConfig",
    "all_methods", "dequantize", "get_delta_model", "get_method", "get_peft_model", "get_peft_model_state_dict",
    "prepare_for_kbit_training", "prepare_model_for_kbit_training", "quant", "quantize", "register",
    "register_architecture", "replace_lora_weights_loftq", "set_peft_model_state_dict",
]

"""Quantised base models: bitsandbytes 4/8-bit and torchao int8 linear layers under layer methods.

    model = dt.quantize(model, "nf4")            # or load with transformers' BitsAndBytesConfig
                                                 # (embeddings=True: the tied embedding/LM head too)
    model = dt.prepare_for_kbit_training(model)
    delta = dt.get_delta_model(model, dt.LoraConfig(r=8, target_modules="all-linear"))

Layer methods wrap a quantised linear layer exactly as a float one. What differs is reading and
writing the base weight when merging (dequantise, add, re-quantise): each backend provides one
accessor for that, registered with :mod:`deltatune.weights`. Importing this package imports neither
bitsandbytes nor torchao.
"""

from __future__ import annotations

from ..weights import model_quantization, quantization, register_weight_access
from .bnb import Bnb4bitAccess, Bnb8bitAccess
from .convert import (
    KINDS,
    QuantizationError,
    dequantize,
    prepare_for_kbit_training,
    quantize,
    require_backend,
)
from .embedding import EmbeddingAccess, dequantize_embeddings, quantize_embeddings
from .torchao import TorchaoInt8Access

for _access in (Bnb4bitAccess(), Bnb8bitAccess(), TorchaoInt8Access(), EmbeddingAccess()):
    register_weight_access(_access)

__all__ = [
    "KINDS", "QuantizationError", "dequantize", "dequantize_embeddings", "model_quantization",
    "prepare_for_kbit_training", "quantization", "quantize", "quantize_embeddings", "require_backend",
]

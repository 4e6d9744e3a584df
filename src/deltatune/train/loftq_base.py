"""``deltatune train --quantize KIND --method-opt init_lora_weights=loftq``: LoftQ from the command line.

LoftQ (Li et al., arXiv 2310.08659) picks the quantized base ``Q`` and LoRA's ``A``, ``B`` together so that
``Q + s B A`` is close to the float weight ``W`` (:mod:`deltatune.methods.lora.loftq`). It needs the *float*
weights, so such a run loads the base in float and quantizes it itself, as ``--quantize`` names it:

1. every linear layer LoRA does not target is quantized plainly, ``quant(W)`` (:func:`deltatune.quantize`,
   heads kept in float), so the whole base is in ``KIND`` as with any ``--quantize`` run;
2. the targeted layers become LoftQ's ``Q_T`` while LoRA is added (``loftq_config`` gets the kind and block
   size of ``--quantize``: ``nf4``, ``fp4``, ``nf4:32``, ``int8``; ``loftq_bits`` follows them).

The saved fingerprint records ``Q``: with ``loftq_iter=1`` (the default) ``Q_1 = quant(W)`` is the usual
quantized load of the model, so eval/generate/merge reload the run folder like a QLoRA run's. With more
iterations ``Q_T`` is a new base that the run folder does not hold, so the command line refuses them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..config import DeltaConfig
from ..errors import ConfigError
from ..registry import get_method
from ..targeting import find_targets

#: The ``--quantize`` kinds LoftQ can fit (bitsandbytes'; torchao's int8 has no LoftQ quantizer here).
LOFTQ_KINDS = ("nf4", "fp4", "int8")


def wants_loftq(method_options: Any) -> bool:
    """Whether the method options ask for LoftQ's initialisation."""
    return isinstance(method_options, dict) and method_options.get("init_lora_weights") == "loftq"


def complete_loftq_options(method: str, method_options: dict[str, Any], quantize: str | None,
                           quantize_embeddings: bool, fsdp: bool = False) -> None:
    """Refuse what LoftQ cannot do from the command line, and fill ``method_options["loftq_config"]`` with the
    quantization of ``--quantize`` (in place); runs with the other option checks, before anything loads."""
    from ..quant.convert import parse_kind
    from ..quant.spec import kind_spec

    if not wants_loftq(method_options):
        return
    fields = {f.name for f in dataclasses.fields(get_method(method).config_cls)}
    if "loftq_config" not in fields:
        raise ConfigError(f"init_lora_weights=loftq is LoRA's LoftQ initialisation; method {method!r} has none. "
                          "Use --method lora.")
    if quantize is None:
        raise ConfigError("init_lora_weights=loftq quantizes the targeted layers of the float base and fits LoRA to "
                          "the quantization error, so it needs the quantization: add --quantize nf4 (or fp4, int8, "
                          "nf4:32 ...).")
    kind, blocksize = parse_kind(quantize)
    if kind not in LOFTQ_KINDS:
        raise ConfigError(f"--quantize {quantize} cannot be used with init_lora_weights=loftq: LoftQ fits a bitsandbytes "
                          f"quantization ({', '.join(LOFTQ_KINDS)}; nf4/fp4 also KIND:BLOCKSIZE). Use one of those, or "
                          "drop init_lora_weights=loftq.")
    if quantize_embeddings:
        raise ConfigError("--quantize-embeddings is not supported with init_lora_weights=loftq; drop it (the embedding "
                          "stays in float, as in any --quantize run without it).")
    given = method_options.get("loftq_config") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"loftq_config must be a mapping such as {{loftq_iter: 2}}, got {given!r}.")
    bits, spelled = 8 if kind == "int8" else 4, kind_spec(kind, blocksize)
    if given.get("loftq_bits", bits) != bits:
        raise ConfigError(f"loftq_config loftq_bits={given['loftq_bits']!r} disagrees with --quantize {quantize} "
                          f"({bits}-bit); drop loftq_bits (it follows --quantize) or make them agree.")
    if "loftq_quantization" in given and kind_spec(*parse_kind(str(given["loftq_quantization"]))) != spelled:
        raise ConfigError(f"loftq_config loftq_quantization={given['loftq_quantization']!r} disagrees with --quantize "
                          f"{quantize}; drop it (it follows --quantize).")
    if given.get("loftq_iter", 1) != 1:
        raise ConfigError(f"loftq_config loftq_iter={given['loftq_iter']!r}: the command line runs LoftQ with one "
                          "iteration only (its base is the usual --quantize load, so the run folder reloads for "
                          "eval/generate/merge); for more, use the Python API and keep the LoftQ base with the adapter.")
    method_options["loftq_config"] = {"loftq_iter": 1, **given, "loftq_bits": bits, "loftq_quantization": spelled}


def load_loftq_base(float_model: nn.Module, config: DeltaConfig, method: str) -> nn.Module:
    """Quantize ``float_model``'s linear layers that ``config`` does not target (step 1 above) and ready it for
    k-bit training; LoRA's injection then turns the targets into LoftQ's ``Q_T`` (step 2)."""
    from ..inject import resolve_targets
    from ..quant import prepare_for_kbit_training, quantize

    spec = get_method(method)
    targets = {t.path for t in find_targets(float_model, config, resolve_targets(float_model, spec, config))}
    kind = config.loftq_config["loftq_quantization"]  # set by complete_loftq_options
    quantize(float_model, kind, skip=targets, missing_ok=True)
    return prepare_for_kbit_training(float_model, use_gradient_checkpointing=False)

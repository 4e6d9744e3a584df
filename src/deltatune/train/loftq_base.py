"""``deltatune train --quantize KIND --method-opt init_lora_weights=loftq``: LoftQ from the command line.

LoftQ (Li et al., arXiv 2310.08659) picks the quantized base ``Q`` and LoRA's ``A``, ``B`` together so that
``Q + s B A`` is close to the float weight ``W`` (:mod:`deltatune.methods.lora.loftq`). It needs the *float*
weights, so such a run loads the base in float and quantizes it itself, as ``--quantize`` names it:

1. every linear layer LoRA does not target is quantized plainly, ``quant(W)`` (:func:`deltatune.quantize`,
   heads kept in float; with ``--quantize-embeddings`` the token embedding too), so the whole base is in
   ``KIND`` as with any ``--quantize`` run;
2. the targeted layers become LoftQ's ``Q_T`` while LoRA is added (``loftq_config`` gets the kind and block
   size of ``--quantize``: ``nf4``, ``fp4``, ``nf4:32``, ``int8``; ``loftq_bits`` follows them).

The saved fingerprint records ``Q``: with ``loftq_iter=1`` (the default) ``Q_1 = quant(W)`` is the usual
quantized load of the model, so eval/generate/merge reload the run folder like a QLoRA run's. With more
iterations ``Q_T`` is a new base: the adapter folder then also holds :data:`LOFTQ_BASE_FILE`, the LoftQ layers'
``dequant(Q_T)`` (float32, ``(out, in)``, safetensors), and :func:`apply_loftq_base` writes them into the
usual quantized load, which quantizes them to ``Q_T``'s codes again (the fingerprint check then passes).
This is peft's advice to its LoftQ users (keep the LoftQ base with the adapter), for the targeted layers only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DeltaConfig
from ..errors import ConfigError
from ..methods.lora.config import LOFTQ_KINDS
from ..registry import get_method
from ..targeting import find_targets

#: With ``loftq_iter > 1``: the LoftQ layers' ``dequant(Q_T)``, saved beside the adapter.
LOFTQ_BASE_FILE = "loftq_base.safetensors"


def wants_loftq(method_options: Any) -> bool:
    """Whether the method options ask for LoftQ's initialisation."""
    return isinstance(method_options, dict) and method_options.get("init_lora_weights") == "loftq"


def complete_loftq_options(method: str, method_options: dict[str, Any], quantize: str | None) -> None:
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
    method_options["loftq_config"] = {"loftq_iter": 1, **given, "loftq_bits": bits, "loftq_quantization": spelled}


def load_loftq_base(float_model: nn.Module, config: DeltaConfig, method: str, embeddings: bool = False) -> nn.Module:
    """Quantize ``float_model``'s linear layers that ``config`` does not target (step 1 above; ``embeddings``:
    the token embedding and a head tied to it too, as ``--quantize-embeddings`` says) and ready it for k-bit
    training; LoRA's injection then turns the targets into LoftQ's ``Q_T`` (step 2)."""
    from ..inject import resolve_targets
    from ..quant import prepare_for_kbit_training, quantize

    spec = get_method(method)
    targets = {t.path for t in find_targets(float_model, config, resolve_targets(float_model, spec, config))}
    kind = config.loftq_config["loftq_quantization"]  # set by complete_loftq_options
    quantize(float_model, kind, skip=targets, embeddings=embeddings, missing_ok=True)
    return prepare_for_kbit_training(float_model, use_gradient_checkpointing=False)


def finish_loftq_model(model: nn.Module) -> None:
    """After LoRA's injection: LoftQ's new 4-bit layers get the CPU training forward that
    :func:`deltatune.prepare_for_kbit_training` gave the others (:mod:`deltatune.quant.bnb_training`; same numbers;
    an int8 LoftQ model has none to change, and LoftQ needs bitsandbytes installed either way)."""
    from ..quant.bnb_training import use_training_matmul

    use_training_matmul(model.get_base_model())


def save_loftq_base(model: nn.Module, folder: Path, method_options: dict[str, Any]) -> Path | None:
    """With ``loftq_iter > 1``: write every LoftQ layer's ``dequant(Q_T)`` into ``folder`` (the adapter folder);
    ``model`` is the trained ``DeltaModel``. Returns the file, or ``None`` when ``Q`` is the usual quantization."""
    from safetensors.torch import save_file

    from ..inject import iter_wrappers
    from ..weights import quantization, read_weight

    if not wants_loftq(method_options) or method_options["loftq_config"].get("loftq_iter", 1) == 1:
        return None
    tensors = {f"{path}.weight": read_weight(wrapper.get_base_layer()).detach().float().cpu().contiguous()
               for path, wrapper in iter_wrappers(model.get_base_model())
               if quantization(wrapper.get_base_layer()) is not None}  # (out, in) each
    file = Path(folder) / LOFTQ_BASE_FILE
    save_file(tensors, str(file), metadata={"format": "pt", "content": "LoftQ base layers, dequant(Q_T)"})
    return file


@torch.no_grad()
def apply_loftq_base(base: nn.Module, folder: Path | None) -> int:
    """Write the LoftQ layers saved in ``folder`` (if any) into ``base``, loaded quantized as the adapter's base
    was; returns how many layers were written. Every tensor is checked before the first one is written."""
    from safetensors import safe_open

    from ..structure.modules import linear_dims
    from ..weights import quantization, write_weight

    file = Path(folder) / LOFTQ_BASE_FILE if folder is not None else None
    if file is None or not file.is_file():
        return 0
    modules = dict(base.named_modules())
    with safe_open(str(file), framework="pt", device="cpu") as handle:
        names = handle.keys()  # a safetensors handle, not a dict
        tensors = {name.removesuffix(".weight"): handle.get_tensor(name) for name in names}
    for path, weight in tensors.items():
        module = modules.get(path)
        if module is None or quantization(module) is None:
            raise ConfigError(f"{file} holds LoftQ's quantized base layer {path}, which this base model "
                              f"{'lacks' if module is None else 'holds in float'}: load the base quantized as the "
                              "adapter was trained (deltatune does so unless --quantize says otherwise).")
        dims = linear_dims(module)
        if dims is None or tuple(weight.shape) != (dims[1], dims[0]):
            raise ConfigError(f"{file}: {path} is {tuple(weight.shape)}, the model's layer is {dims}; is it the "
                              "same model?")
    for path, weight in tensors.items():
        write_weight(modules[path], weight.to(next(modules[path].parameters()).device))
    return len(tensors)

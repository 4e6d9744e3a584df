"""Turn a float model into a quantised one and back, and get it ready for k-bit training.

``quantize(model, kind)`` swaps each ``nn.Linear`` (except the output head and ``skip``) for the
backend's module, quantising its weight (the bitsandbytes kinds also take transformers' ``Conv1D``, GPT-2's
linear layer with an ``(in, out)`` weight, quantized transposed as transformers' ``BitsAndBytesConfig`` does): ``"nf4"`` / ``"fp4"`` (bitsandbytes 4-bit with double
quantisation), ``"int8"`` (bitsandbytes LLM.int8()), ``"torchao-int8"`` (torchao int8 weight-only).
4-bit kinds take a block size (values per float scale, default 64): ``quantize(model, "nf4", blocksize=32)``,
spelled ``"nf4:32"`` where one string names the quantization (the CLI's ``--quantize``, the fingerprint).
This is what ``transformers``' ``BitsAndBytesConfig`` / ``TorchAoConfig`` do at load time; use it
where loading that way is not possible (a model already in memory, a plain ``nn.Module``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

import torch
from torch import nn

from ..model_interface import HEAD_NAMES, output_head_paths
from ..structure.modules import is_transposed_linear
from ..weights import quantization, read_weight
from .errors import QuantizationError
from .spec import BLOCKSIZES, DEFAULT_BLOCKSIZE, FOUR_BIT

#: kind -> (package, minimum version, what it is)
KINDS: dict[str, tuple[str, str, str]] = {
    "nf4": ("bitsandbytes", "0.46", "bitsandbytes 4-bit NormalFloat, double quantisation"),
    "fp4": ("bitsandbytes", "0.46", "bitsandbytes 4-bit float, double quantisation"),
    "int8": ("bitsandbytes", "0.46", "bitsandbytes LLM.int8() (int8 weights, one scale per row)"),
    "torchao-int8": ("torchao", "0.10", "torchao int8 weight-only (one scale per row)"),
}


def parse_kind(spec: str, blocksize: int | None = None) -> tuple[str, int | None]:
    """``(kind, blocksize)`` of a quantization ``spec`` (``"nf4"``, ``"nf4:32"``, ``"int8"`` ...) and an optional
    ``blocksize`` given separately; the block size is ``None`` for kinds without blocks, else 64 unless set.
    Raises :class:`QuantizationError` for an unknown kind, a block size a kind has no use for, or one that
    bitsandbytes does not support."""
    if not isinstance(spec, str):
        raise QuantizationError(f"A quantization is a string such as 'nf4' or 'nf4:32', got {spec!r}.")
    kind, sep, size = spec.partition(":")
    if kind not in KINDS:
        raise QuantizationError(f"Unknown quantization {spec!r}; choose one of {', '.join(KINDS)} "
                                "(nf4 and fp4 also as KIND:BLOCKSIZE, e.g. nf4:32).")
    if sep:
        if not size.isdigit():
            raise QuantizationError(f"Quantization {spec!r}: the block size after ':' must be a whole number, "
                                    f"one of {', '.join(map(str, BLOCKSIZES))}.")
        if blocksize is not None and blocksize != int(size):
            raise QuantizationError(f"Quantization {spec!r} and blocksize={blocksize} disagree; give the block size once.")
        blocksize = int(size)
    if kind not in FOUR_BIT:
        if blocksize is not None:
            raise QuantizationError(f"{kind} has no block size (it keeps one scale per row); a block size applies to "
                                    "the 4-bit kinds nf4 and fp4 only.")
        return kind, None
    if blocksize is None:
        return kind, DEFAULT_BLOCKSIZE
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise QuantizationError(f"Block size {blocksize!r} is not supported by bitsandbytes' 4-bit quantization; "
                                f"choose one of {', '.join(map(str, BLOCKSIZES))} (default {DEFAULT_BLOCKSIZE}).")
    return kind, blocksize


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())


def require_backend(kind: str) -> None:
    """Raise :class:`QuantizationError` (with the pip command) unless ``kind`` (``"nf4:32"`` too) can run here."""
    kind, _ = parse_kind(kind)
    package, minimum, _ = KINDS[kind]
    if importlib.util.find_spec(package) is None:
        raise QuantizationError(
            f"--quantize {kind} needs the {package} package, which is not installed: "
            f"pip install '{package}>={minimum}' (or pip install 'deltatune[quant]')."
        )
    from importlib.metadata import version

    found = version(package)
    if _version_tuple(found) < _version_tuple(minimum):
        raise QuantizationError(
            f"--quantize {kind} needs {package}>={minimum} (CPU support); {found} is installed: "
            f"pip install -U '{package}>={minimum}'."
        )


def quantize(model: nn.Module, kind: str, compute_dtype: torch.dtype | None = None,
             skip: Iterable[str] = (), embeddings: bool = False, blocksize: int | None = None,
             missing_ok: bool = False) -> nn.Module:
    """Quantise ``model``'s linear layers in place (and return it).

    Args:
        model: a float model without adapters (quantise first, then add adapters).
        kind: ``"nf4"``, ``"fp4"``, ``"int8"`` or ``"torchao-int8"`` (4-bit kinds also ``"nf4:32"``: see ``blocksize``).
        compute_dtype: dtype of 4-bit matmuls (default: the model's weight dtype).
        skip: module paths to keep in float, besides the output head and task heads (``classifier``, ``score``...).
        embeddings: also quantize the input token embedding, and the LM head when it is tied to it
            (:mod:`deltatune.quant.embedding`); off by default, as in transformers' quantized loading.
        blocksize: nf4/fp4 only: values per block scale, one of :data:`BLOCKSIZES` (default 64, as bitsandbytes
            and transformers). Smaller blocks cost memory (double quantisation: about 0.13 more bits per value
            at 32) and follow the weights more closely, e.g. weights that were once quantized in blocks of 32.
        missing_ok: return the model unchanged when every linear layer is skipped, instead of raising (for
            callers that quantize the skipped layers another way, as LoftQ does).
    """
    kind, blocksize = parse_kind(kind, blocksize)
    require_backend(kind)
    if any(getattr(m, "_delta_base_child", None) for m in model.modules()):
        raise QuantizationError("quantize() the base model before adding adapters (get_delta_model), not after.")
    if any(quantization(m) for m in model.modules()):
        raise QuantizationError(f"The model is quantized already ({model_quantization_text(model)}); load it in float "
                                "to quantize it another way.")
    heads = {name for names in HEAD_NAMES.values() for name in names}  # task heads train in full: keep them float
    keep = set(skip) | output_head_paths(model) | {p for p, _ in model.named_modules() if p.rpartition(".")[2] in heads}
    if kind == "torchao-int8":
        from .torchao import quantize_torchao_int8

        done = quantize_torchao_int8(model, keep)
    else:
        from .bnb import make_bnb_linear

        done = []
        for path, module in list(model.named_modules()):
            if not (type(module) is nn.Linear or is_transposed_linear(module)) or path in keep:
                continue
            dtype = compute_dtype or module.weight.dtype
            parent, _, child = path.rpartition(".")
            layer = make_bnb_linear(module, kind, dtype, blocksize=blocksize or DEFAULT_BLOCKSIZE)
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            done.append(path)
    if not done and not missing_ok:
        raise QuantizationError(f"quantize({kind!r}): the model has no nn.Linear layer to quantize (besides its head).")
    if embeddings:
        from .embedding import quantize_embeddings

        quantize_embeddings(model, kind)
    copy_float_tensors_off_the_file(model)
    if kind in ("nf4", "fp4", "int8"):  # what transformers sets on a bitsandbytes load (HF peft reads it)
        setattr(model, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)
    return model


def copy_float_tensors_off_the_file(model: nn.Module) -> int:
    """Give each float (unquantized) CPU parameter and buffer of ``model`` its own memory; returns how many.

    transformers loads safetensors memory-mapped: a float tensor is a view of the file's mapping, and the
    mapping lives (with every page of the file read while loading, all float32 weights included) as long as
    one view does. After quantizing, the embedding and the norms still view it, so the process kept the
    whole float file resident: SmolLM2-135M in nf4 held 498 MB after loading (160 MB of weights), 201 MB
    once these tensors were copied and the mapping freed. The copy keeps each ``Parameter`` object (ties,
    optimizer references) and costs one tensor's size at a time.
    """
    copied = 0
    for module in model.modules():
        if quantization(module) is not None:
            continue  # the backend's storage: made when quantizing, not a view of the file
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for _, tensor in tensors:
            if tensor.device.type == "cpu" and tensor.is_floating_point():
                tensor.data = tensor.data.clone()
                copied += 1
    return copied


def model_quantization_text(model: nn.Module) -> str:
    kinds = sorted({k for k in (quantization(m) for m in model.modules()) if k})
    return "+".join(kinds) if kinds else "float"


def dequantize(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every quantised linear layer (also inside adapter wrappers) by an ``nn.Linear`` holding
    its dequantised weight in ``dtype``, and a quantized embedding (and the head tied to it) by float
    ones; adapters merged afterwards are merged in full precision.

    A layer quantized from transformers' ``Conv1D`` (GPT-2; it records ``source_cls``, as transformers' own
    loading does) becomes a ``Conv1D`` again, weight ``(in, out)``, so the model saves in its own format;
    inside an adapter wrapper, which was built for the quantized ``(out, in)`` layer, it stays an ``nn.Linear``
    that remembers ``source_cls``, and :func:`restore_source_layers` turns it back once unwrapped (merged)."""
    from .embedding import dequantize_embeddings

    dequantize_embeddings(model, dtype)
    for path, module in list(model.named_modules()):
        if not path or quantization(module) is None:
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device="meta", dtype=dtype)
        linear.weight = nn.Parameter(read_weight(module).to(dtype), requires_grad=False)  # (out, in)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        if getattr(module, "source_cls", None) is not None:
            linear.source_cls = module.source_cls
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    restore_source_layers(model)
    _forget_quantization(model)
    return model


def restore_source_layers(model: nn.Module) -> list[str]:
    """Turn every float ``nn.Linear`` made from a transformers ``Conv1D`` (``source_cls``) back into a ``Conv1D``
    holding the transposed weight ``(in, out)`` (the same function ``x W + b``), except inside adapter wrappers;
    returns the paths changed. Without it a dequantized or merged GPT-2 saves ``(out, in)`` weights under names
    transformers reads as ``(in, out)``."""
    changed = []
    for path, module in list(model.named_modules()):
        source = getattr(module, "source_cls", None)
        if (not path or type(module) is not nn.Linear or module.bias is None or not isinstance(source, type)
                or source.__name__ != "Conv1D"):
            continue
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if getattr(parent, "_delta_base_child", None) == child:
            continue  # the wrapper was built for the (out, in) layer
        with torch.device("meta"):
            conv = source(module.out_features, module.in_features)  # Conv1D(nf=out, nx=in): weight (in, out)
        conv.weight = nn.Parameter(module.weight.detach().T.contiguous(), requires_grad=module.weight.requires_grad)
        conv.bias = nn.Parameter(module.bias.detach(), requires_grad=module.bias.requires_grad)
        setattr(parent, child, conv)
        changed.append(path)
    return changed


def _forget_quantization(model: nn.Module) -> None:
    """Drop what transformers (or :func:`quantize`) recorded about a model's quantization, so it casts,
    moves and saves as a plain float model (what transformers' own ``dequantize`` also removes)."""
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    if "quantization_method" in vars(model):
        del model.quantization_method
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None


def prepare_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool | None = None,
                              gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """Get a quantised model ready for adapter training (what HF peft's function of this name does).

    Freezes every base parameter, casts the float parameters kept in half precision (norms, embeddings,
    the head) to float32 for stable training, and turns gradient checkpointing on (non-reentrant) with
    gradients flowing into the input embeddings, so that adapters inside checkpointed blocks get
    gradients although every base weight is frozen. As in peft, checkpointing is on by default: it is
    what makes QLoRA's training memory small (activations are recomputed in the backward pass, about a
    third more compute). ``use_gradient_checkpointing``: ``None`` (default) turns it on when the model
    supports it (transformers models), ``True`` requires it, ``False`` leaves it off. bitsandbytes
    4-bit weights are kept in the layout its training path reads (:func:`.bnb.keep_training_layout`), and
    their layers dequantize once fewer per step under checkpointing, with the same numbers
    (:mod:`.bnb_training`).
    """
    from .bnb import keep_training_layout

    keep_training_layout(model)
    four_bit = _has_4bit_layers(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if quantization(module) is not None:
            continue  # the quantised weight and its companions stay as the backend keeps them
        for name, param in module.named_parameters(recurse=False):
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    enable = getattr(model, "gradient_checkpointing_enable", None)
    supported = enable is not None and getattr(model, "supports_gradient_checkpointing", True)
    if use_gradient_checkpointing is True and not supported:
        raise QuantizationError(f"{type(model).__name__} does not support gradient checkpointing; "
                                "pass use_gradient_checkpointing=False.")
    if use_gradient_checkpointing is not False and supported:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or {"use_reentrant": False})
    if four_bit:
        from .bnb_training import use_training_matmul

        use_training_matmul(model)
    return model


def _has_4bit_layers(model: nn.Module) -> bool:
    from .bnb import Bnb4bitAccess

    return any(Bnb4bitAccess().owns(module) for module in model.modules())


def flag_checkpointing(model: nn.Module) -> int:
    """Call after turning gradient checkpointing on for a model that :func:`prepare_for_kbit_training` readied
    without it: its 4-bit layers keep their dequantized weight for backward only inside layers whose
    checkpointing function carries :mod:`.bnb_training`'s flag, and the functions just made do not (same
    numbers either way; without the flag each weight is dequantized a third time in backward). Returns how many
    layers were flagged (0 for a model without bitsandbytes 4-bit layers)."""
    if not _has_4bit_layers(model):
        return 0
    from .bnb_training import flag_checkpointed_layers

    return flag_checkpointed_layers(model)

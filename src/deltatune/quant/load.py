"""Load a transformers model quantized the ecosystem way, and tell how an adapter's base was quantized.

``from_pretrained_quantized`` passes transformers a ``BitsAndBytesConfig`` (nf4/fp4 with double
quantisation, or int8) or a ``TorchAoConfig`` (int8 weight-only), keeping the output and task heads
in float. The layers it makes are those :func:`deltatune.quant.quantize` makes (the tests check the
fingerprints agree), and a model loaded this way can be saved again with ``save_pretrained``. This is
the one loader the CLI commands (train, eval, generate, merge, serve) call for ``--quantize`` (and
``--quantize-embeddings``: ``embeddings=True``). An adapter records how its base was quantized in its
fingerprint; :func:`recorded_quantization` reads it back so a trained run reloads its base the same way.
A 4-bit block size other than bitsandbytes' 64 (``"nf4:32"``, or ``blocksize=32``) has no transformers
config: such a model is loaded in float32 and quantized in memory by :func:`deltatune.quant.quantize`
(same layers, same fingerprint rules; the whole float model is resident while it is quantized).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model_interface import HEAD_NAMES
from .convert import (
    KINDS,
    QuantizationError,
    copy_float_tensors_off_the_file,
    parse_kind,
    quantize,
    require_backend,
)
from .spec import DEFAULT_BLOCKSIZE, kind_spec

#: Modules kept in float: the LM head and every task head (trained in full, or too small to matter).
FLOAT_MODULES = sorted({"lm_head", *(name for names in HEAD_NAMES.values() for name in names)})


def quantization_config(kind: str, compute_dtype: torch.dtype = torch.float32) -> Any:
    """The transformers quantization config for ``kind`` (checks the backend package first)."""
    kind, blocksize = parse_kind(kind)
    require_backend(kind)
    if blocksize not in (None, DEFAULT_BLOCKSIZE):
        raise QuantizationError(f"transformers' BitsAndBytesConfig has no block size ({kind_spec(kind, blocksize)!r}); "
                                "use from_pretrained_quantized or deltatune.quantize(model, kind, blocksize=...).")
    if kind == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=FLOAT_MODULES)
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=FLOAT_MODULES)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=FLOAT_MODULES)


def from_pretrained_quantized(cls: Any, path: str, kind: str, device: torch.device | str = "cpu",
                              embeddings: bool = False, blocksize: int | None = None, **kwargs: Any) -> nn.Module:
    """``cls.from_pretrained(path, ...)`` with ``kind`` quantization, on ``device``; ``embeddings=True``
    then quantizes the input embedding (and the tied LM head) too (:mod:`deltatune.quant.embedding`).
    ``blocksize`` (or ``kind="nf4:32"``): values per 4-bit block scale (default 64; see the module docstring)."""
    kind, blocksize = parse_kind(kind, blocksize)  # a bad kind or block size fails before anything is loaded
    device = torch.device(device)
    if blocksize not in (None, DEFAULT_BLOCKSIZE):
        require_backend(kind)
        model = cls.from_pretrained(path, dtype=torch.float32, **kwargs)
        return quantize(model, kind, embeddings=embeddings, blocksize=blocksize).to(device)
    config = quantization_config(kind)
    model = cls.from_pretrained(path, quantization_config=config, dtype=torch.float32, device_map={"": str(device)},
                                **kwargs)
    if embeddings:
        from .embedding import quantize_embeddings

        quantize_embeddings(model, kind)
    copy_float_tensors_off_the_file(model)  # frees the float file's mapping (see there)
    return model


def check_quantize_options(quantize: str | None, quantize_embeddings: bool) -> None:
    """Refuse ``--quantize-embeddings`` without ``--quantize`` (before anything is loaded or written)."""
    if quantize_embeddings and not quantize:
        raise QuantizationError("--quantize-embeddings needs --quantize KIND (nf4, fp4, int8 or torchao-int8; nf4:32 ...): it "
                                "quantizes the token embedding the same way as the linear layers. (eval, generate and "
                                "merge of a run trained with both flags reload its base that way without either.)")


def recorded_quantization(folder: str | Path) -> tuple[str | None, bool]:
    """``(kind, embeddings)``: how the base of the adapter in ``folder`` was quantized when it was trained (from
    its saved fingerprint): the linear layers' kind (``None``: a float base) and whether the token embedding
    was quantized too (fingerprint ``"embedding-nf4+nf4"``, as :func:`from_pretrained_quantized` with
    ``embeddings=True`` makes it)."""
    from ..checkpoint.state import read_fingerprint
    from ..config import CONFIG_NAME

    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        return None, False
    try:
        fingerprint = read_fingerprint(Path(folder), json.loads(path.read_text(encoding="utf-8")))
    except ValueError:
        return None, False
    recorded = (fingerprint or {}).get("quantization")
    if recorded is None:
        return None, False
    parts = recorded.split("+")
    linear = [p for p in parts if not p.startswith("embedding-")]
    embedding = [p.removeprefix("embedding-") for p in parts if p.startswith("embedding-")]
    try:
        linear_kind = parse_kind(linear[0])[0] if len(linear) == 1 else None
    except QuantizationError:
        linear_kind = None
    if linear_kind is None or (embedding and embedding != [linear_kind]):
        raise QuantizationError(f"The adapter in {folder} was trained on a base quantized as {recorded!r}, which the "
                                f"CLI cannot reproduce (it loads one of {', '.join(KINDS)} (nf4/fp4 also KIND:BLOCKSIZE), optionally with the "
                                "embedding quantized the same way); load that base in Python.")
    return linear[0], bool(embedding)


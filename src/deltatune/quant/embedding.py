"""A quantized token embedding, and the LM head tied to it computing with the same quantized storage.

In a small LLM the vocabulary matrix ``E`` (vocab, dim) is a large share of the weights (SmolLM2-135M:
49152 x 576, 21% of the parameters, 113 MB in float32), and a tied LM head reads the same matrix:
``logits = h E^T``. Quantizing only the linear layers leaves it in float. Here ``E`` is stored once:

* ``"nf4"`` / ``"fp4"``: 4-bit codes ``q`` (two per byte) with one float32 scale per block of
  ``BLOCK`` values in a row, ``E[r, j] ~ scale[r, j // BLOCK] * code[q[r, j]]`` with the NF4 / FP4
  code book of QLoRA (Dettmers et al., arXiv 2305.14314; bitsandbytes' tables). Blocks never cross a
  row, so looking up tokens gathers whole blocks;
* ``"int8"`` (for the ``int8`` and ``torchao-int8`` kinds): ``E[r, :] ~ scale[r] * q[r, :]`` with ``q`` int8
  and one scale per row (``absmax / 127``), the row-wise scheme of LLM.int8() (arXiv 2208.07339) and
  torchao's int8 weight-only.

:class:`QuantizedEmbedding` looks tokens up by dequantizing only their rows. :class:`TiedQuantizedHead`
computes ``h E^T`` in chunks of ``CHUNK`` vocabulary rows (one float chunk alive at a time) and its
backward ``grad_h = grad_logits E`` the same way; ``E`` is frozen, so it gets no gradient. Both are
frozen base modules: adapters target the linear layers, not these.

In a state dict (and so in a whole-model ``save_pretrained``, e.g. after ``merge_and_unload()`` or
``deltatune merge``) a :class:`QuantizedEmbedding` is the ``nn.Embedding`` it stands for: ``weight`` holds
the dequantized float values (vocab, dim). transformers has no format for this storage, so the saved folder
reloads with plain ``from_pretrained`` as a model whose embedding (and tied head) is float, computing the
same logits; :func:`quantize_embeddings` on it gives back the same codes. Loading such a state dict into a
:class:`QuantizedEmbedding` quantizes it again. deltatune's adapter-only saves (``save_pretrained`` of a
``DeltaModel`` or of the model it wraps, ``get_peft_model_state_dict``, training checkpoints) read the adapter
tensors from their owners and never dequantize ``E``; HF peft's own ``save_pretrained`` picks the adapter keys out
of the whole ``state_dict()`` and so pays one dequantization of ``E`` per save.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .errors import QuantizationError

BLOCK = 64  # values per 4-bit scale block (bitsandbytes' default)
CHUNK = 8192  # vocabulary rows dequantized at a time in the tied head
#: quantization kind -> storage format of the embedding
FORMATS = {"nf4": "nf4", "fp4": "fp4", "int8": "int8", "torchao-int8": "int8"}


def code_book(fmt: str) -> torch.Tensor:
    """The 16 values of the 4-bit NF4 / FP4 code book (bitsandbytes' tables), float32."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type(fmt, device="cpu").float()


def quantize_rows(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of ``weight`` (rows, dim): int8 (rows, dim) + (rows,), or packed uint8
    (rows, dim / 2) + (rows, dim / BLOCK)."""
    w = weight.detach().float()
    if fmt == "int8":
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # (rows,)
        return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales
    rows, dim = w.shape
    blocks = w.reshape(rows, dim // BLOCK, BLOCK)
    scales = blocks.abs().amax(dim=2).clamp_min(1e-12)  # (rows, dim / BLOCK)
    book, order = code_book(fmt).sort()
    mids = (book[1:] + book[:-1]) / 2
    codes = torch.empty(rows, dim, dtype=torch.uint8)
    for lo in range(0, rows, CHUNK):  # nearest code book entry, a chunk of rows at a time
        normed = (blocks[lo:lo + CHUNK] / scales[lo:lo + CHUNK, :, None]).reshape(-1, dim)
        codes[lo:lo + CHUNK] = order[torch.bucketize(normed, mids)].to(torch.uint8)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]  # (rows, dim / 2): even column in the high nibble
    return packed, scales


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """Float rows (rows, dim) from :func:`quantize_rows`' storage (any row subset of it)."""
    if fmt == "int8":
        return (codes.float() * scales[:, None]).to(dtype)
    book = code_book(fmt)
    rows = codes.shape[0]
    values = torch.stack([book[(codes >> 4).long()], book[(codes & 0xF).long()]], dim=-1).reshape(rows, -1)
    return (values.reshape(rows, -1, BLOCK) * scales[:, :, None]).reshape(rows, -1).to(dtype)


class QuantizedEmbedding(nn.Module):
    """A frozen token embedding stored quantized (see the module docstring); forward as ``nn.Embedding``."""

    def __init__(self, embedding: nn.Embedding, kind: str) -> None:
        super().__init__()
        if kind not in FORMATS:
            raise ValueError(f"no embedding format for quantization {kind!r}; choose one of {sorted(FORMATS)}")
        self.kind, self.fmt = kind, FORMATS[kind]
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        self.dtype = embedding.weight.dtype
        codes, scales = quantize_rows(embedding.weight, self.fmt)
        self.weight = nn.Parameter(codes.to(embedding.weight.device), requires_grad=False)
        self.weight.deltatune_embedding_shape = (self.num_embeddings, self.embedding_dim)  # for param_numel
        self.register_buffer("scales", scales.to(embedding.weight.device))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Dequantized rows ``start:stop`` of the embedding matrix, (stop - start, dim)."""
        return dequantize_rows(self.weight[start:stop], self.scales[start:stop], self.fmt, self.dtype)

    def dequantized(self) -> torch.Tensor:
        """The whole embedding matrix in float, (vocab, dim)."""
        return self.rows(0, self.num_embeddings)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., dim)
        flat = input_ids.reshape(-1)
        out = dequantize_rows(self.weight[flat], self.scales[flat], self.fmt, self.dtype)
        return out.reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, kind={self.kind}"

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dequantized()  # (vocab, dim) float: what nn.Embedding saves

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        weight = state_dict[key]
        if not weight.is_floating_point() or tuple(weight.shape) != (self.num_embeddings, self.embedding_dim):
            error_msgs.append(f"{key}: a quantized embedding loads the float ({self.num_embeddings}, "
                              f"{self.embedding_dim}) matrix it stands for, got {weight.dtype} {tuple(weight.shape)}")
            return
        codes, scales = quantize_rows(weight, self.fmt)
        with torch.no_grad():
            self.weight.copy_(codes)
            self.scales.copy_(scales)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k != key
                                   and "." not in k[len(prefix):])


class _TiedHeadMatmul(torch.autograd.Function):
    """``h E^T`` with ``E`` dequantized a chunk of rows at a time, forward and backward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, embedding: QuantizedEmbedding) -> torch.Tensor:
        ctx.embedding = embedding  # hidden (..., dim) -> logits (..., vocab)
        out = hidden.new_empty(*hidden.shape[:-1], embedding.num_embeddings)
        for lo in range(0, embedding.num_embeddings, CHUNK):
            hi = min(lo + CHUNK, embedding.num_embeddings)
            out[..., lo:hi] = hidden @ embedding.rows(lo, hi).to(hidden.dtype).T
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        embedding: QuantizedEmbedding = ctx.embedding  # grad (..., vocab) -> (..., dim)
        grad_hidden = grad.new_zeros(*grad.shape[:-1], embedding.embedding_dim)
        for lo in range(0, embedding.num_embeddings, CHUNK):
            hi = min(lo + CHUNK, embedding.num_embeddings)
            grad_hidden += grad[..., lo:hi] @ embedding.rows(lo, hi).to(grad.dtype)
        return grad_hidden, None


class TiedQuantizedHead(nn.Module):
    """The LM head tied to a :class:`QuantizedEmbedding`: ``logits = h E^T`` from the embedding's storage.

    The embedding is referenced, not registered as a child: its storage is counted, saved and moved
    once, as the input embedding's, exactly as a tied float head holds no weight of its own.
    """

    def __init__(self, embedding: QuantizedEmbedding) -> None:
        super().__init__()
        object.__setattr__(self, "embedding", embedding)
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _TiedHeadMatmul.apply(hidden, self.embedding)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the quantized embedding"


class EmbeddingAccess:
    """How fingerprints and :func:`deltatune.weights.quantization` see a :class:`QuantizedEmbedding`.

    Its kind is ``"embedding-<kind>"``, so a model whose embedding is quantized is told apart from one
    whose embedding is float. Merging never writes it (adapters do not target it).
    """

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, QuantizedEmbedding)

    def kind(self, module: nn.Module) -> str:
        return f"embedding-{module.kind}"

    def read(self, module: nn.Module) -> torch.Tensor:
        return module.dequantized().float()

    def write(self, module: nn.Module, weight: torch.Tensor) -> None:
        raise NotImplementedError("a quantized embedding is frozen; adapters do not write it")

    def owns_param(self, param: torch.Tensor) -> bool:
        return hasattr(param, "deltatune_embedding_shape")

    def param_tensors(self, param: torch.Tensor) -> list[torch.Tensor]:
        return [param.data]

    def param_numel(self, param: torch.Tensor) -> int:
        return math.prod(param.deltatune_embedding_shape)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _path_of(model: nn.Module, target: nn.Module) -> str:
    return next(path for path, module in model.named_modules(remove_duplicate=False) if module is target)


def quantize_embeddings(model: nn.Module, kind: str) -> list[str]:
    """Quantize ``model``'s input token embedding in place, and its LM head when tied to it (the head
    then computes with the embedding's quantized storage). Returns the paths replaced.

    An untied output head is left in float (as :func:`deltatune.quant.quantize` leaves every head).
    """
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if get_input else None
    if not isinstance(embedding, nn.Embedding):
        raise QuantizationError(f"{type(model).__name__} has no nn.Embedding input embedding (get_input_embeddings()) "
                                "to quantize; pass embeddings=False.")
    dim = embedding.embedding_dim
    if FORMATS[kind] != "int8" and dim % BLOCK:
        raise QuantizationError(f"A {kind} embedding needs a width divisible by {BLOCK} (this one is {dim}); use "
                                "int8, or pass embeddings=False.")
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if get_output else None
    tied = isinstance(head, nn.Linear) and head.weight is embedding.weight and head.bias is None
    quantized = QuantizedEmbedding(embedding, kind)
    paths = [_path_of(model, embedding)]
    if tied:
        paths.append(_path_of(model, head))
        _set_module(model, paths[1], TiedQuantizedHead(quantized))
    _set_module(model, paths[0], quantized)
    return paths


def quantized_embedding_paths(model: nn.Module) -> list[str]:
    """Paths of ``model``'s :class:`QuantizedEmbedding` modules (a whole-model save writes them in float)."""
    return [path for path, module in model.named_modules() if isinstance(module, QuantizedEmbedding)]


def dequantize_embeddings(model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Undo :func:`quantize_embeddings`: float ``nn.Embedding`` (and a float head tied to it again)."""
    floats: dict[int, nn.Embedding] = {}
    for path, module in list(model.named_modules()):
        if isinstance(module, QuantizedEmbedding):
            embedding = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                                     device="meta", dtype=dtype)
            embedding.weight = nn.Parameter(module.dequantized().to(dtype), requires_grad=False)  # (vocab, dim)
            floats[id(module)] = embedding
            _set_module(model, path, embedding)
    for path, module in list(model.named_modules()):
        if isinstance(module, TiedQuantizedHead):
            head = nn.Linear(module.in_features, module.out_features, bias=False, device="meta", dtype=dtype)
            head.weight = floats[id(module.embedding)].weight  # tied again: one tensor
            _set_module(model, path, head)

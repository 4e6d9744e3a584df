"""LoftQ: LoRA-fine-tuning-aware quantization (Li et al., arXiv 2310.08659).

QLoRA freezes ``Q = quant(W)`` and starts LoRA at ``B = 0``, so training starts from the quantized model
and first has to win back the quantization error ``W - Q``. LoftQ picks ``Q`` and ``A``, ``B`` together so
that ``Q + s B A`` is close to the float ``W`` (``s`` the LoRA scale, ``alpha / r``), alternating T times::

    B_0 A_0 = 0
    Q_t = quant(W - s B_{t-1} A_{t-1})                    t = 1 .. T
    U S V^T = svd(W - dequant(Q_t))                       (out, in)
    A_t = sqrt(S_r / s) V_r^T   (r, in)      B_t = U_r sqrt(S_r / s)   (out, r)

so that ``s B_t A_t`` is the best rank-``r`` approximation of ``W - dequant(Q_t)`` (the singular values are
split evenly between the factors, and divided by ``s`` so the scaled product is what fits). ``quant`` is
bitsandbytes' NF4 (``loftq_bits=4``, with deltatune's double quantisation of the block scales, as
:func:`deltatune.quantize` does) or LLM.int8() (``loftq_bits=8``); ``LoftQConfig(loftq_quantization=...)`` picks
FP4 or another block size (``"fp4"``, ``"nf4:32"``: what ``--quantize`` takes).

In deltatune the targeted ``nn.Linear`` (or GPT-2's ``Conv1D``, whose ``(in, out)`` weight is fitted transposed,
``W = W_conv^T``) is then *replaced* by the bitsandbytes layer holding ``Q_T`` (real
4-bit or 8-bit storage, frozen), so training after it is QLoRA; non-targeted layers stay as they were
(``target_modules="all-linear"`` quantizes every linear layer but the head, as ``dt.quantize`` does). The new
4-bit layers keep bitsandbytes' training layout, as :func:`deltatune.prepare_for_kbit_training` makes the layers
it finds keep it, so evaluating before or during training leaves the gradients right.
HF peft's ``init_lora_weights="loftq"`` differs in three ways: it keeps the base in float holding
``dequant(Q)`` (you save that and reload it quantized), it quantizes without double quantisation, and it
leaves ``s`` out of the split (its ``Q + s B A`` fits ``W`` only when ``lora_alpha == r``).

Saving: the adapter file is written as plain LoRA (``init_lora_weights=True``), since its ``A``, ``B`` fit
this ``Q`` and no other; the base-model fingerprint saved with it records ``Q``'s codes, so loading it onto
another base is refused. With ``loftq_iter=1``, ``Q_1 = quant(W)`` is exactly the base that
``dt.quantize(model, "nf4")`` or transformers' ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`` build from the same float weights, so the
adapter loads onto the usual quantized load of the original model. With more iterations ``Q_T`` is a
different base: keep that model (or its ``Q``) with the adapter, as peft asks its LoftQ users to save the
LoftQ base model beside the adapter. On a base that is quantized already,
:func:`.loftq_quantized.replace_lora_weights_loftq` fits ``A``, ``B`` to it from the float weights in the model's
safetensors file.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ...errors import TargetError
from ...structure.modules import is_transposed_linear, row_major_weight
from ...targeting import find_targets, unwrapped
from ...weights import quantization, read_weight
from .config import LoftQConfig, LoraConfig


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None, kind: str, compute_dtype: torch.dtype,
                     blocksize: int | None = None) -> nn.Module:
    """A bitsandbytes linear layer (``kind``: ``"nf4"``/``"fp4"``/``"int8"``) holding ``quant(weight)``.

    ``weight``: ``(out, in)``; the layer lands on ``weight``'s device; ``bias`` is kept in float; ``blocksize``:
    values per 4-bit block scale (default 64).
    """
    from ...quant.bnb import make_bnb_linear
    from ...quant.spec import DEFAULT_BLOCKSIZE

    out_features, in_features = weight.shape
    shell = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    shell.weight = nn.Parameter(weight.detach().to(compute_dtype), requires_grad=False)
    if bias is not None:
        shell.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return make_bnb_linear(shell, kind, compute_dtype, blocksize or DEFAULT_BLOCKSIZE)


def svd_factors(error: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, in), B (out, r))`` with ``s B A`` the best rank-``r`` approximation of ``error`` ``(out, in)``:
    ``A = sqrt(S_r / s) V_r^T``, ``B = U_r sqrt(S_r / s)``."""
    u, sv, vh = torch.linalg.svd(error, full_matrices=False)
    root = (sv[:rank] / scaling).sqrt()  # (r,)
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


@torch.no_grad()
def loftq_factors(
    weight: torch.Tensor, rank: int, scaling: float, iters: int, quantize: Callable[[torch.Tensor], nn.Module],
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """LoftQ's alternation for one weight ``W`` ``(out, in)``: ``(layer holding Q_T, A_T (r, in), B_T (out, r))``.

    ``quantize(residual)`` returns a quantized layer for a float ``(out, in)`` weight; its dequantized weight is
    read back with :func:`deltatune.weights.read_weight`.
    """
    target = weight.detach().float()  # (out, in)
    a = b = None
    layer: nn.Module | None = None
    for _ in range(iters):
        residual = target if a is None else target - scaling * (b @ a)  # what Q must hold: W - s B A
        layer = quantize(residual)
        a, b = svd_factors(target - read_weight(layer).float().to(target.device), rank, scaling)  # W - dequant(Q_t)
    assert layer is not None and a is not None and b is not None  # iters >= 1 (LoftQConfig checks it)
    return layer, a, b


def init_loftq(a: torch.Tensor, b: torch.Tensor, base: nn.Module, scaling: float, settings: LoftQConfig) -> nn.Module:
    """Fill ``a`` ``(r, in)`` and ``b`` ``(out, r)`` with LoftQ's factors for ``base``'s float weight and return the
    bitsandbytes layer holding ``Q_T``, which replaces ``base``.

    ``base`` is an ``nn.Linear`` or transformers' ``Conv1D``; the alternation runs on ``W = `` the Conv1D's
    ``(in, out)`` weight transposed, and the bitsandbytes linear layer holding ``Q_T`` ``(out, in)`` computes
    ``x dequant(Q_T)^T + b``, the Conv1D's function (as :func:`deltatune.quantize` and transformers'
    ``BitsAndBytesConfig`` replace a Conv1D).
    """
    from ...quant.bnb import keep_training_layout
    from ...quant.convert import parse_kind

    kind, blocksize = parse_kind(settings.quantization())
    dtype = base.weight.dtype

    def quantize(weight: torch.Tensor) -> nn.Module:
        return quantized_linear(weight, base.bias, kind, dtype, blocksize)

    weight = row_major_weight(base)  # (out, in)
    layer, factor_a, factor_b = loftq_factors(weight, a.shape[0], scaling, settings.loftq_iter, quantize)
    with torch.no_grad():
        a.copy_(factor_a)
        b.copy_(factor_b)
    if is_transposed_linear(base):
        layer.source_cls = type(base)  # as dt.quantize records it: dt.dequantize gives the Conv1D back
    layer.train(base.training)
    keep_training_layout(layer)  # LoftQ starts training: the layout prepare_for_kbit_training keeps (see there)
    return layer


def loftq_refusal(module: nn.Module, base: nn.Module, quantized: str | None) -> str | None:
    """Why LoftQ cannot start on ``base`` (wrapped as ``module``), or ``None``; checked before anything changes."""
    if quantized:
        return (f"init_lora_weights='loftq' quantizes the float weight itself, and this layer is quantized "
                f"already ({quantized}); pass the float model (LoftQ quantizes the targeted layers), or add LoRA "
                "with the default initialisation and call dt.replace_lora_weights_loftq(model, float_model_path)")
    if module is not base:
        return ("init_lora_weights='loftq' replaces the base layer by its quantization, and this layer already "
                "carries adapters; give the LoftQ adapter first, on the plain model")
    if type(base) is not nn.Linear and not is_transposed_linear(base):
        return (f"init_lora_weights='loftq' replaces the layer by a bitsandbytes linear layer, which has no form "
                f"for a {type(base).__name__} (a subclass of nn.Linear with its own forward); exclude it")
    if base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return (f"init_lora_weights='loftq' needs a float weight (float32, float16 or bfloat16); this one is "
                f"{base.weight.dtype}: load the model in float, or exclude this layer")
    return None


def check_loftq_targets(model: nn.Module, config: LoraConfig, default: str | None) -> None:
    """Refuse LoftQ, before any layer changes, when a target layer is quantized already (also under
    ``"all-linear"``, where other refused layers are skipped silently) or when bitsandbytes is missing."""
    from ...quant import require_backend

    require_backend(LoftQConfig.of(config.loftq_config).quantization())
    wanted = config.target_modules if config.target_modules is not None else default
    if wanted is None:
        return  # injection raises its own error about the missing targets
    try:
        targets = find_targets(model, config, wanted)
    except TargetError:
        return  # injection raises the same error with its full message
    quantized = {t.path: kind for t in targets if (kind := quantization(unwrapped(t.module)))}
    if quantized:
        path, kind = next(iter(quantized.items()))
        raise TargetError(f"{len(quantized)} of the target modules are quantized already ({path}: {kind}). "
                          "init_lora_weights='loftq' quantizes the float weights itself: call get_delta_model on "
                          "the float model (LoftQ quantizes the targeted layers), or add LoRA with the default "
                          "initialisation to this base and call dt.replace_lora_weights_loftq(model, float_model_path).")

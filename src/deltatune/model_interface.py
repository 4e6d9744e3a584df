"""Where a model keeps what the methods need: the one per-architecture table.

Methods ask for *roles* (``"q"``, ``"v"``, ``"down"``, ...) and get a regular expression over module
paths for the model at hand; the core and the methods never spell an architecture's module names
themselves. Architectures missing here still work when the user names target modules explicitly.

Each role maps to a regex fragment that must match the *end* of a module path (after a dot):

* ``q`` / ``k`` / ``v``: the attention's query / key / value projections (GPT-2 fuses them in ``c_attn``);
* ``o``: the attention's output projection (self- and cross-attention);
* ``up``: the feed-forward block's input projection(s) (gated MLPs: gate and up);
* ``gate``: the gate projection of a gated MLP;
* ``down``: the feed-forward block's output projection;
* ``attn_block``: the attention sub-module;
* ``enc_self_attn`` / ``cross_attn``: encoder-decoder models' encoder self-attention modules and
  decoder cross-attention modules (each holding its own ``k`` / ``v`` projections);
* ``ffn_block``: the module computing the whole feed-forward block from its input, ``FFN(x)``
  (BERT-style ``*Output`` modules are the exception: see :data:`RESIDUAL_INPUT_BLOCKS`).

Where an architecture has no module for a role, :data:`MISSING_ROLES` says why, so a method can
raise an error that explains it.
"""

from __future__ import annotations

import re

from torch import nn

_LLAMA_LIKE = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
    "attn_block": r"self_attn", "ffn_block": r"mlp",
}

ROLE_TABLE: dict[str, dict[str, str]] = {
    "bert": {
        "q": "query", "k": "key", "v": "value", "o": r"attention\.output\.dense",
        "up": r"intermediate\.dense", "down": r"\d+\.output\.dense",
        "attn_block": r"\d+\.attention", "ffn_block": r"\d+\.output",
    },
    "distilbert": {
        "q": "q_lin", "k": "k_lin", "v": "v_lin", "o": "out_lin", "up": "lin1", "down": "lin2",
        "attn_block": "attention", "ffn_block": "ffn",
    },
    "gpt2": {
        "q": "c_attn", "k": "c_attn", "v": "c_attn", "o": r"attn\.c_proj",
        "up": "c_fc", "down": r"mlp\.c_proj", "attn_block": "attn", "ffn_block": "mlp",
    },
    "llama": _LLAMA_LIKE,
    "t5": {
        "q": r"(SelfAttention|EncDecAttention)\.q", "k": r"(SelfAttention|EncDecAttention)\.k",
        "v": r"(SelfAttention|EncDecAttention)\.v", "o": r"(SelfAttention|EncDecAttention)\.o",
        "up": r"DenseReluDense\.wi(_0|_1)?", "down": r"DenseReluDense\.wo",
        "attn_block": r"(SelfAttention|EncDecAttention)", "ffn_block": r"DenseReluDense",
        "enc_self_attn": r"encoder\.block\.\d+\.layer\.\d+\.SelfAttention", "cross_attn": r"EncDecAttention",
    },
    "bart": {
        "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj", "up": "fc1", "down": "fc2",
        "attn_block": r"(self_attn|encoder_attn)",
        "enc_self_attn": r"encoder\.layers\.\d+\.self_attn", "cross_attn": r"encoder_attn",
    },
}
#: Roles an architecture has no module for, and why (methods quote the reason in their errors).
MISSING_ROLES: dict[str, dict[str, str]] = {
    "bart": {
        "ffn_block": "BART computes its feed-forward block inline in the decoder/encoder layer's forward "
        "(fc1 -> activation -> fc2), so no single module takes the block's input and returns its output",
    },
}

#: Block modules (by class name) whose forward is ``f(h, residual) = LayerNorm(FFN_out(h) + residual)``:
#: the block's input ``x`` arrives as the positional argument given here (BERT's ``BertOutput(h, x)``
#: gets the intermediate activation ``h`` and the residual ``x``). Something added "beside" such a
#: block is added to that argument, which equals adding it to the block's output before the norm.
RESIDUAL_INPUT_BLOCKS: dict[str, int] = {
    name: 1 for name in ("BertOutput", "RobertaOutput", "XLMRobertaOutput", "ElectraOutput", "CamembertOutput")
}

for _alias, _same_as in {
    "roberta": "bert", "xlm-roberta": "bert", "electra": "bert", "camembert": "bert",
    "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama", "gemma2": "llama",
    "olmo": "llama", "mt5": "t5", "mbart": "bart",
}.items():
    ROLE_TABLE[_alias] = ROLE_TABLE[_same_as]

#: Names under which task heads sit (trained in full and saved with the adapter for SEQ_CLS).
HEAD_NAMES: dict[str, list[str]] = {
    "SEQ_CLS": ["classifier", "score", "classification_head", "pre_classifier"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}


def model_type(model: nn.Module) -> str | None:
    """The transformers ``config.model_type`` of ``model`` (``None`` for a plain ``nn.Module``)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def role_regex(model: nn.Module, roles: list[str]) -> str | None:
    """A full-match regex over module paths selecting ``roles`` of ``model``, or ``None`` if unknown."""
    table = ROLE_TABLE.get(model_type(model) or "")
    if table is None:
        return None
    fragments = sorted({table[r] for r in roles if r in table})
    if not fragments:
        return None
    return r"(.*\.)?(" + "|".join(f"(?:{f})" for f in fragments) + ")"


def missing_role_reason(model: nn.Module, role: str) -> str | None:
    """Why ``model``'s architecture has no module for ``role`` (``None`` if it has one or is unknown)."""
    return MISSING_ROLES.get(model_type(model) or "", {}).get(role)


def residual_input_arg(module: nn.Module) -> int | None:
    """Positional index of the residual input of a BERT-style output block (see :data:`RESIDUAL_INPUT_BLOCKS`)."""
    return RESIDUAL_INPUT_BLOCKS.get(type(module).__name__)


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear-like module (``Conv1D`` stores its weight ``(in, out)``)."""
    if not is_linear_like(module):
        return None
    if isinstance(module, nn.Linear):  # read the sizes, not the weight: a quantized weight is packed
        return module.in_features, module.out_features
    rows, cols = module.weight.shape
    return (cols, rows) if isinstance(module, nn.Linear) else (rows, cols)


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or a transposed linear layer (transformers' GPT-2 style ``Conv1D``)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, nn.Parameter) and weight.dim() == 2


def is_norm_layer(module: nn.Module) -> bool:
    """A normalisation layer with a learned scale (``nn.LayerNorm``, ``LlamaRMSNorm``, ``T5LayerNorm``, ...).

    Recognised by structure, not by a list of classes: a class name ending in ``Norm`` (any case) that owns
    a ``weight`` parameter. Batch/group norms are left out (their features live on dimension 1).
    """
    name = type(module).__name__
    if not name.lower().endswith("norm") or name.lower().startswith(("batchnorm", "groupnorm", "instancenorm")):
        return False
    return isinstance(getattr(module, "weight", None), nn.Parameter)


def output_head_paths(model: nn.Module) -> set[str]:
    """Module paths of the output head (the module holding the output embeddings), if any."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head}


def head_names(task_type: str | None) -> list[str]:
    """Head module names to train in full for ``task_type``."""
    return list(HEAD_NAMES.get(task_type or "", []))


def layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    """The block index in a module path (``encoder.layer.3.attention`` -> 3), or ``None``."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    if patterns:
        for pattern in patterns:
            match = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", path)
            if match:
                return int(match.group(1))
        return None
    match = re.search(r"\.(\d+)(?:\.|$)", "." + path)
    return int(match.group(1)) if match else None

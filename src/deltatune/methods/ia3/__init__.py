"""(IA)^3: infused adapter by inhibiting and amplifying inner activations (Liu et al., arXiv 2205.05638).

    k' = l_k * (W_k x),   v' = l_v * (W_v x),   ffn: W_down (l_ff * act(W_up x))

Trains one vector per wrapped layer (``ia3_l``, initialised to ones, so the model starts equal to
the base); all weights stay frozen. In deltatune terms a wrapped layer rescales its output, or, for
``feedforward_modules``, its input (HF peft's convention). Mergeable: ``W <- W * l`` along the
output rows (input columns for feed-forward modules); unmerging divides again.

Default targets (``IA3Config()``): the key and value projections and the feed-forward output
projection of the architecture, the latter treated as feed-forward (its input, the feed-forward
activation, is rescaled). Where q, k, v are fused in one projection (GPT-2's ``c_attn``), only its
key and value rows are rescaled: the query rows of the vector stay 1 (HF peft rescales the whole fused
output; its files, whose query rows are not 1, are read with that meaning). Saved in HF peft's format (``peft_type: IA3``, tensors ``...ia3_l``).
Wraps ``nn.Linear``, transformers' ``Conv1D`` and ungrouped ``nn.Conv1d/2d/3d``.
"""

from __future__ import annotations

from torch import nn

from ...model_interface import fused_qkv_rows, role_paths, role_regex
from ...registry import MethodSpec, register
from .combine import combine_ia3
from .config import IA3Config
from .layer import IA3Layer, can_wrap, is_feedforward

#: Roles of :mod:`deltatune.model_interface` wrapped by default, and the ones treated as feed-forward.
DEFAULT_ROLES = ["k", "v", "down"]
FEEDFORWARD_ROLES = ["down"]


def default_targets(model: nn.Module, config: IA3Config) -> str | None:
    """Keys, values and the feed-forward output projection (``None`` for unknown architectures)."""
    return role_regex(model, DEFAULT_ROLES)


def prepare_config(model: nn.Module, config: IA3Config) -> None:
    """Resolve ``target_modules`` / ``feedforward_modules`` left at ``None`` for this architecture.

    The resolved regexes are what ``adapter_config.json`` records, so HF peft (whose own default
    table differs, e.g. for BERT) loads exactly the same layout.
    """
    if config.target_modules is None:
        config.target_modules = default_targets(model, config)
        # a fused query/key/value projection: only its key and value rows are rescaled (not saved: the
        # file holds 1 in the query rows, which is what they act as, so either library reads it alike)
        config.fixed_rows = {path: fused_qkv_rows(model, path)["q"] for path in role_paths(model, "qkv")}
    if config.feedforward_modules is None:
        config.feedforward_modules = role_regex(model, FEEDFORWARD_ROLES) or []


SPEC = register(
    MethodSpec(
        name="ia3",
        peft_type=IA3Config.PEFT_TYPE,
        config_cls=IA3Config,
        kind="layer",
        layer_cls=IA3Layer,
        default_targets=default_targets,
        mergeable=True,
        prepare_config=prepare_config,
        can_wrap=can_wrap,
        combine=combine_ia3,
    )
)

__all__ = ["SPEC", "IA3Config", "IA3Layer", "is_feedforward"]

"""LayerNorm tuning (Zhao et al., "Tuning LayerNorm in Attention", arXiv 2312.11420; HF peft ``LN_TUNING``).

    LN(x) = gamma * (x - mean) / std + beta   ->   gamma, beta trained (RMSNorm: gamma only)

Each adapter trains its own copy of every chosen normalisation layer; all other weights stay frozen.
Mergeable: the adapter's ``gamma``/``beta`` replace the base layer's (originals restored exactly on
unmerge). Files are HF peft's: ``peft_type: "LN_TUNING"``, tensors
``base_model.model.<module>.ln_tuning_layers.weight`` / ``.bias``.
"""

from __future__ import annotations

import re

from torch import nn

from ...errors import TargetError
from ...model_interface import is_norm_layer
from ...registry import MethodSpec, register
from ...targeting import unwrapped_modules
from .config import LNTuningConfig
from .layer import LNTuningLayer, can_wrap


def default_targets(model: nn.Module, config: LNTuningConfig) -> str:
    """Every normalisation layer: a regex over the norms' module names when those names are used by
    norms only (``(.*\\.)?(LayerNorm|ln_f)``), otherwise over their full paths."""
    modules = unwrapped_modules(model)
    norms = [p for p, m in modules.items() if is_norm_layer(m)]
    if not norms:
        raise TargetError(f"{type(model).__name__} has no normalisation layer for LayerNorm tuning to train.")
    leaves = sorted({p.rsplit(".", 1)[-1] for p in norms})
    by_leaf = [p for p in modules if p.rsplit(".", 1)[-1] in leaves]
    if all(p in norms for p in by_leaf):
        return r"(.*\.)?(?:" + "|".join(re.escape(leaf) for leaf in leaves) + ")"
    return "(?:" + "|".join(re.escape(p) for p in norms) + ")"


def prepare_config(model: nn.Module, config: LNTuningConfig) -> None:
    """Record the resolved default targets, so HF peft (whose default table differs) rebuilds the same layout."""
    if config.target_modules is None:
        config.target_modules = default_targets(model, config)


SPEC = register(
    MethodSpec(
        name="ln_tuning",
        peft_type=LNTuningConfig.PEFT_TYPE,
        config_cls=LNTuningConfig,
        kind="layer",
        layer_cls=LNTuningLayer,
        default_targets=default_targets,
        mergeable=True,
        can_wrap=can_wrap,
        prepare_config=prepare_config,
    )
)

__all__ = ["SPEC", "LNTuningConfig", "LNTuningLayer"]

"""LoKr: low-rank Kronecker product adaptation (Yeh et al., "LyCORIS", arXiv 2212.10650).

    h = W x + dW x,   dW = (alpha / r) * kron(W1, W2),   W1: (a, c),  W2: (b, d),  out = a b,  in = c d

``W2`` (and with ``decompose_both`` also ``W1``) is a rank-r product when that is smaller. Trains the
factors; ``W`` stays frozen. Mergeable: ``W <- W + dW``. Wraps ``nn.Linear``, transformers'
``Conv1D``, ``nn.Conv1d`` and ``nn.Conv2d``. Files are HF peft's: ``peft_type: "LOKR"``, tensors
``<module>.lokr_w1``, ``lokr_w2_a``, ... Default targets: the attention query and value projections.
"""

from __future__ import annotations

from torch import nn

from ...model_interface import role_regex
from ...registry import MethodSpec, register
from .config import LoKrConfig
from .layer import LoKrLinear, can_wrap, factorization


def default_targets(model: nn.Module, config: LoKrConfig) -> str | None:
    """Query and value projections of the attention."""
    return role_regex(model, ["q", "v"])


SPEC = register(
    MethodSpec(
        name="lokr",
        peft_type=LoKrConfig.PEFT_TYPE,
        config_cls=LoKrConfig,
        kind="layer",
        layer_cls=LoKrLinear,
        default_targets=default_targets,
        mergeable=True,
        can_wrap=can_wrap,
    )
)

__all__ = ["SPEC", "LoKrConfig", "LoKrLinear", "factorization"]

"""LoHa: low-rank Hadamard product adaptation (FedPara, Hyeon-Woo et al., arXiv 2108.06098; LyCORIS).

    h = W x + dW x,   dW = (alpha / r) * (W1a W1b) * (W2a W2b)   (* element-wise)

Trains the four factors; ``W`` stays frozen. Mergeable: ``W <- W + dW``. Wraps ``nn.Linear``, transformers' ``Conv1D``, ``nn.Conv1d`` and ``nn.Conv2d`` (optionally with a CP core over
the kernel, ``use_effective_conv2d``).
Files are HF peft's: ``peft_type: "LOHA"``, tensors ``<module>.hada_w1_a`` etc. Default targets: the
attention query and value projections (as LoRA).
"""

from __future__ import annotations

from torch import nn

from ...model_interface import role_regex
from ...registry import MethodSpec, register
from .config import LoHaConfig
from .layer import LoHaLinear, can_wrap


def default_targets(model: nn.Module, config: LoHaConfig) -> str | None:
    """Query and value projections of the attention."""
    return role_regex(model, ["q", "v"])


SPEC = register(
    MethodSpec(
        name="loha",
        peft_type=LoHaConfig.PEFT_TYPE,
        config_cls=LoHaConfig,
        kind="layer",
        layer_cls=LoHaLinear,
        default_targets=default_targets,
        mergeable=True,
        can_wrap=can_wrap,
    )
)

__all__ = ["SPEC", "LoHaConfig", "LoHaLinear"]

"""OFT: orthogonal fine-tuning (Qiu et al., "Controlling Text-to-Image Diffusion by Orthogonal
Finetuning", arXiv 2306.07280), in HF peft's current (>= 0.18) parametrisation.

    h = W (R x) + b,   R = diag(R_1, ..., R_n),   R_i = cayley(Q_i),   Q_i = S_i - S_i^T  (b x b)

Each block's skew-symmetric generator trains (``b (b - 1) / 2`` numbers per block); ``W`` stays
frozen and keeps its singular values (an orthogonal ``R`` only rotates its input space). Mergeable:
``W <- W R^T``. Wraps ``nn.Linear``, transformers' ``Conv1D`` and ``nn.Conv2d`` (each flattened filter
rotated; see :mod:`.layer`). Files are HF peft's ``OFT``: ``<module>.oft_R.weight`` ``(n, b (b - 1) / 2)``.
Default targets: the attention query and value projections.
"""

from __future__ import annotations

from torch import nn

from ...model_interface import role_regex
from ...registry import MethodSpec, register
from .config import OFTConfig
from .layer import OFTConv2d, OFTLinear, can_wrap, make_oft_layer


def default_targets(model: nn.Module, config: OFTConfig) -> str | None:
    """Query and value projections of the attention."""
    return role_regex(model, ["q", "v"])


SPEC = register(
    MethodSpec(
        name="oft",
        peft_type=OFTConfig.PEFT_TYPE,
        config_cls=OFTConfig,
        kind="layer",
        make_layer=make_oft_layer,
        default_targets=default_targets,
        mergeable=True,
        can_wrap=can_wrap,
    )
)

__all__ = ["SPEC", "OFTConfig", "OFTConv2d", "OFTLinear"]

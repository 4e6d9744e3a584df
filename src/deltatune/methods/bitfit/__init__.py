"""BitFit: bias-terms fine-tuning (Ben Zaken, Ravfogel and Goldberg, arXiv 2106.10199).

    h = W x + (b + db)

Only a change ``db`` of each bias trains (one vector per wrapped module, zero at the start, so the
model starts equal to the base); every weight and the original biases stay frozen. Mergeable:
``b <- b + db``; unmerging subtracts it again.

Default targets: every linear (``nn.Linear``, ``Conv1D``), convolution and normalisation layer that
has a bias, task heads excepted. Models without biases (Llama, T5) have nothing to train: adding the
adapter raises :class:`~deltatune.errors.TargetError` saying so. HF peft has no BitFit, so the file
format is deltatune's own in peft's layout: ``peft_type: "BITFIT"``, tensors
``base_model.model.<module>.bitfit_bias``.
"""

from __future__ import annotations

import re

from torch import nn

from ...errors import TargetError
from ...registry import MethodSpec, register
from ...targeting import unwrapped_modules
from .config import BitFitConfig
from .layer import BitFitLayer, can_wrap, has_trainable_bias_slot


def default_targets(model: nn.Module, config: BitFitConfig) -> str:
    """A regex naming every module with a bias BitFit can train.

    Raises:
        TargetError: the model has no such bias (Llama and T5 use ``bias=False`` everywhere).
    """
    paths = [p for p, m in unwrapped_modules(model).items() if has_trainable_bias_slot(m)]
    if not paths:
        raise TargetError(
            f"{type(model).__name__} has no bias in any linear, convolution or normalisation layer, so BitFit has "
            "nothing to train. Use a method that adds its own parameters (ln_tuning, lora, ia3, ...)."
        )
    return "(?:" + "|".join(re.escape(p) for p in paths) + ")"


SPEC = register(
    MethodSpec(
        name="bitfit",
        peft_type=BitFitConfig.PEFT_TYPE,
        config_cls=BitFitConfig,
        kind="layer",
        layer_cls=BitFitLayer,
        default_targets=default_targets,
        mergeable=True,
        can_wrap=can_wrap,
    )
)

__all__ = ["SPEC", "BitFitConfig", "BitFitLayer"]

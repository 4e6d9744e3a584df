"""AdaLoRA: adaptive budget allocation for parameter-efficient fine-tuning (Zhang et al., arXiv 2303.10512).

    h = W x + s / (r0 + 1e-5) * P (Lambda * Q) x,   P: (out, r0), Lambda: (r0, 1), Q: (r0, in)

LoRA written as an SVD-like triplet sum. While training, a step hook (:mod:`.allocator`, driven by
:mod:`deltatune.step_hooks` from deltatune's loop or ``transformers.Trainer`` through
:class:`~deltatune.integrations.trainer_callback.DeltaStepCallback`) scores every triplet, prunes the lowest to a
falling budget (``init_r`` -> ``target_r`` per layer on average), and adds the orthogonality
regulariser's gradient. Mergeable like LoRA. Files are HF peft's ``ADALORA``: ``<module>.lora_A``,
``lora_B``, ``lora_E`` holding the kept triplets, and ``rank_pattern`` in ``adapter_config.json``.
"""

from __future__ import annotations

from torch import nn

from ...model_interface import role_regex
from ...registry import MethodSpec, register
from .allocator import RankBudget, make_rank_budget
from .config import AdaLoraConfig
from .layer import AdaLoraLinear, can_wrap


def default_targets(model: nn.Module, config: AdaLoraConfig) -> str | None:
    """Query and value projections of the attention."""
    return role_regex(model, ["q", "v"])


SPEC = register(
    MethodSpec(
        name="adalora",
        peft_type=AdaLoraConfig.PEFT_TYPE,
        config_cls=AdaLoraConfig,
        kind="layer",
        layer_cls=AdaLoraLinear,
        default_targets=default_targets,
        mergeable=True,
        can_wrap=can_wrap,
        make_step_hook=make_rank_budget,
    )
)

__all__ = ["SPEC", "AdaLoraConfig", "AdaLoraLinear", "RankBudget"]

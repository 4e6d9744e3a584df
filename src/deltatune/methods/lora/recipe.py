"""LoRA's recommended recipe: every linear layer, rank 32, ``alpha = 2r``, 5x full fine-tuning's rate, 3 epochs.

HF peft's defaults (``r=8``, ``lora_alpha=8``, query/value only), which :class:`LoraConfig` keeps for
compatibility, trailed full fine-tuning by 1.3-1.6 points on TREC and BBC in deltatune's round-one
benchmarks. Biderman et al. ("LoRA Learns Less and Forgets Less", arXiv 2405.09673) report that adapting
every linear layer, and a learning rate about an order of magnitude above full fine-tuning's, matter
most for LoRA's accuracy. deltatune's values were picked on the validation splits of TREC, Rotten
Tomatoes and BBC with MiniLM (``python -m bench.recipe search``; results in ``bench/results/recipe.md``).
Three epochs where full fine-tuning's defaults use two: on validation, the third epoch gained LoRA about
1.3 points (three seeds), and r=32 at lr 5e-4 led r=16 at 1e-3 at three epochs. ``deltatune train`` and
``deltatune demo`` use the options when given no method options, and the rate (epochs) when also given no
``--lr`` (``--epochs``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

#: Config fields of the recipe (the rest keep :class:`LoraConfig`'s defaults).
RECOMMENDED_OPTIONS: dict[str, Any] = {"target_modules": "all-linear", "r": 32, "lora_alpha": 64, "lora_dropout": 0.1}
#: Peak AdamW learning rate the recipe was picked with (linear warm-up over 6 % of steps, linear decay).
RECOMMENDED_LR = 5e-4
#: Passes over the training rows the recipe was picked with.
RECOMMENDED_EPOCHS = 3

_TASK_SUFFIXES = (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
                  ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
                  ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def task_type_of(model: nn.Module | None) -> str | None:
    """peft's ``task_type`` for a transformers model, read from its class name (``None`` when unknown)."""
    if model is None:
        return None
    name = type(model).__name__
    return next((task for suffix, task in _TASK_SUFFIXES if name.endswith(suffix)), None)

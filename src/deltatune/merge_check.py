"""What a merge costs: the logits of the merged model against the unmerged one on a probe batch.

Merging ``W + delta`` into a float weight is exact up to rounding; into a quantized weight it is
``W' = quantize(dequantize(W) + delta)``, and the re-quantization error changes the model. The report
measures that change where it matters, on the outputs:

    max_logit_error  = max |logits_merged - logits_unmerged|
    mean_logit_error = mean |logits_merged - logits_unmerged|

over every position and vocabulary entry of the probe batch (both computed in eval mode, no grad).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, MergeError
from .weights import quantization

#: Shape of the default probe batch: sequences x tokens of seeded random token ids.
PROBE_SHAPE = (4, 32)


@dataclass
class MergeReport:
    """How far the merged model's outputs are from the unmerged model's on the probe batch."""

    max_logit_error: float
    mean_logit_error: float
    probe_tokens: int
    quantized_layers: int  # merged layers whose weight was re-quantized

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = (f"{self.quantized_layers} quantized layers re-quantized" if self.quantized_layers
                 else "float weights")
        return (f"merge error on a probe batch of {self.probe_tokens} tokens ({where}): "
                f"max |logit difference| = {self.max_logit_error:.3g}, mean = {self.mean_logit_error:.3g}")


def default_probe(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Seeded random token ids for a transformers model (``None`` when the model has no ``vocab_size``)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        return None
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(vocab), PROBE_SHAPE, generator=generator).to(device)  # (batch, tokens)
    probe = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        probe["decoder_input_ids"] = ids[:, : PROBE_SHAPE[1] // 2]
    return probe


def probe_outputs(model: nn.Module, probe: Any) -> torch.Tensor:
    """The model's logits (or first output) on ``probe`` (a dict of keyword arguments or a tensor), float32."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**probe) if isinstance(probe, Mapping) else model(probe)
    finally:
        model.train(was_training)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"Cannot read logits from the model's output ({type(out).__name__}) on the merge probe; "
                          "pass a probe the model returns a tensor (or .logits) for.")
    return out.float()


def compare(unmerged: torch.Tensor, merged: torch.Tensor, probe: Any, quantized_layers: int) -> MergeReport:
    diff = (merged - unmerged).abs()
    ids = probe.get("input_ids") if isinstance(probe, Mapping) else probe
    tokens = int(ids.numel()) if isinstance(ids, torch.Tensor) else int(diff[..., 0].numel())
    return MergeReport(float(diff.max()), float(diff.mean()), tokens, quantized_layers)


def measure_merge(delta_model: Any, names: list[str], probe: Any, safe_merge: bool,
                  max_logit_error: float | None) -> MergeReport:
    """Merge ``names`` into ``delta_model`` (a :class:`~deltatune.model.DeltaModel`) and report the change;
    above ``max_logit_error`` the merge is undone and :class:`MergeError` raised."""
    delta_model._check_mergeable(names)
    probe = probe if probe is not None else default_probe(delta_model.get_base_model())
    if probe is None:
        raise ConfigError(f"Measuring a merge needs a probe batch for {type(delta_model.get_base_model()).__name__} (it has "
                          "no config.vocab_size to draw token ids from): pass probe={...} or probe=tensor.")
    unmerged = probe_outputs(delta_model, probe)
    done = delta_model._merge(names, safe_merge)
    try:
        merged = probe_outputs(delta_model, probe)
    except BaseException:
        delta_model._undo_merge(done)
        raise
    requantized = sum(1 for layer, before in done
                      if len(layer.merged_adapters) > before and quantization(layer.get_base_layer()))
    report = compare(unmerged, merged, probe, requantized)
    if max_logit_error is not None and report.max_logit_error > max_logit_error:
        delta_model._undo_merge(done)
        raise MergeError(
            f"Merge refused: {report}, above max_logit_error={max_logit_error}. The model is unchanged (adapters "
            "unmerged). Keep the adapter unmerged, raise the tolerance, or merge into a full-precision copy "
            "(dt.dequantize(model) first; CLI: deltatune merge --dtype float32)."
        )
    return report

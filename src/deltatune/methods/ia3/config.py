"""``IA3Config``: HF peft's field names and defaults, validated on creation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import TargetedConfig
from ...errors import ConfigError


@dataclass
class IA3Config(TargetedConfig):
    """(IA)^3: learned vectors rescaling keys, values and feed-forward activations (Liu et al., arXiv 2205.05638).

    A wrapped layer computes ``l * (W x + b)``, or ``W (l * x) + b`` when it is a feed-forward module.

    Attributes:
        target_modules: modules to wrap (see :class:`~deltatune.config.TargetedConfig`). ``None``: the
            key and value projections and the feed-forward output projection of the architecture
            (from :mod:`deltatune.model_interface`); the resolved choice is saved with the adapter.
        feedforward_modules: the targets whose *input* is rescaled instead of their output (the
            paper's rescaling of the feed-forward activations). A list matches paths that end with
            one of the names (HF peft's rule); a string is a regex matching whole paths. ``None``:
            the architecture's feed-forward output projections (none on architectures the table
            does not know). When both are lists, ``feedforward_modules`` must be a subset of
            ``target_modules``.
        fan_in_fan_out: the base weight is stored ``(in, out)`` (GPT-2's ``Conv1D``); detected
            automatically, kept for HF peft compatibility.
        init_ia3_weights: ``True`` starts every vector at ones (the model starts equal to the base);
            ``False`` draws them from ``N(0, 1)`` (HF peft's behaviour; for tests).
    """

    PEFT_TYPE: ClassVar[str] = "IA3"

    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"init_ia3_weights must be True or False; got {self.init_ia3_weights!r}.")
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise ConfigError(
                f"feedforward_modules {sorted(set(ff) - set(targets))} are not in target_modules {targets}; "
                "every feed-forward module must also be a target. Add them to target_modules or drop them."
            )


__all__ = ["IA3Config"]

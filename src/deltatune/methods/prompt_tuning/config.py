"""``PromptTuningConfig``: HF peft's field names and defaults, validated on creation."""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import ConfigError
from .._virtual_tokens import VirtualTokenConfig

INIT_CHOICES = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


def _plain(value: Any) -> Any:
    """An enum member (HF peft's ``PromptTuningInit.TEXT``) as its plain string value."""
    return getattr(value, "value", value)


@dataclass
class PromptTuningConfig(VirtualTokenConfig):
    """Prompt tuning (Lester et al., arXiv 2104.08691): ``P`` trainable virtual token embeddings.

    Attributes:
        prompt_tuning_init: how the virtual tokens start: ``"RANDOM"`` (``N(0, 1)``, HF peft's
            default), ``"SAMPLE_VOCAB"`` (embeddings of tokens drawn uniformly from the vocabulary)
            or ``"TEXT"`` (the embeddings of ``prompt_tuning_init_text``'s tokens, repeated or cut
            to ``num_virtual_tokens``; the paper's recommended start).
        prompt_tuning_init_text: the text for ``"TEXT"``.
        tokenizer_name_or_path: for ``"TEXT"``: a tokenizer object, or a local folder (or hub id)
            to load one from with ``AutoTokenizer``. A tokenizer object is recorded in
            ``adapter_config.json`` by its ``name_or_path``.
        tokenizer_kwargs: extra arguments for ``AutoTokenizer.from_pretrained`` (``trust_remote_code``
            is always dropped: loading an adapter must not run code).
    """

    PEFT_TYPE: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: Any = None
    tokenizer_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = str(_plain(self.prompt_tuning_init)).upper()
        if self.prompt_tuning_init not in INIT_CHOICES:
            raise ConfigError(f"prompt_tuning_init={self.prompt_tuning_init!r} is not one of {INIT_CHOICES}.")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text (the text to start from).")
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            raise ConfigError("tokenizer_kwargs are only used with prompt_tuning_init='TEXT'; remove them.")
        if isinstance(self.tokenizer_name_or_path, os.PathLike):
            self.tokenizer_name_or_path = os.fspath(self.tokenizer_name_or_path)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        tokenizer = self.tokenizer_name_or_path
        if tokenizer is not None and not isinstance(tokenizer, str):
            out["tokenizer_name_or_path"] = str(getattr(tokenizer, "name_or_path", "") or "") or None
        return out

    def __deepcopy__(self, memo: dict[int, Any]) -> PromptTuningConfig:
        """Deep copy that shares a tokenizer object instead of copying it."""
        new = copy.copy(self)
        for f in dataclasses.fields(self):
            if f.name != "tokenizer_name_or_path":
                setattr(new, f.name, copy.deepcopy(getattr(self, f.name), memo))
        return new

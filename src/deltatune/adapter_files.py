"""Adapter folders in and out: the part of :class:`~deltatune.model.DeltaModel` that reads and writes files.

``save_pretrained`` writes each adapter in HF peft's layout (``adapter_config.json`` plus
``adapter_model.safetensors``, the base fingerprint in the safetensors header) and a ``README.md`` model card;
``load_adapter`` / ``from_pretrained`` read deltatune's and peft's folders, check the base fingerprint, and leave
the model as it was when anything fails. The tensors themselves go through :mod:`deltatune.checkpoint.state`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint.state import (
    AdapterParts,
    apply_tensors,
    check_base,
    read_adapter,
    same_adapter_config,
    save_adapter,
)
from .errors import CheckpointError, ConfigError
from .inject import unwrap
from .integrations.adapter_saving import release
from .integrations.model_card import AdapterSummary, write_model_card
from .registry import as_delta_config, get_method


class AdapterFilesMixin:
    """Saving and loading for a model holding ``peft_config``, ``input_deltas`` and the wrapped model
    (``get_base_model()``); mixed into :class:`~deltatune.model.DeltaModel`."""

    def adapter_parts(self, adapter_name: str) -> AdapterParts:
        """What the file layer (:mod:`deltatune.checkpoint.state`) reads and writes of one adapter."""
        self._check_known(adapter_name)
        delta = self.input_deltas[adapter_name] if adapter_name in self.input_deltas else None  # noqa: SIM401 (ModuleDict has no .get)
        return AdapterParts(self.get_base_model(), self.peft_config[adapter_name], delta)

    def save_pretrained(
        self,
        save_directory: str | Path,
        selected_adapters: list[str] | None = None,
        *,
        state_dict: dict[str, Any] | None = None,
        is_main_process: bool = True,
        safe_serialization: bool = True,
        save_embedding_layers: bool | str = "auto",
    ) -> None:
        """Write each adapter in HF peft's format (``"default"`` at the top, others in subfolders) and a
        ``README.md`` model card.

        The keywords are those transformers' Trainer passes: ``is_main_process=False`` writes nothing (other
        ranks); ``state_dict`` must be ``None`` (the Trainer passes one only from sharded FSDP/DeepSpeed
        models, which this path does not gather: use ``deltatune train --fsdp``); files are always safetensors.
        ``save_embedding_layers`` is HF peft's: ``"auto"`` and ``False`` save the adapter's tensors only (deltatune
        never resizes a vocabulary, the one case where peft's ``"auto"`` adds the base embeddings); ``True`` is refused.
        """
        if save_embedding_layers is True or save_embedding_layers not in ("auto", False):
            raise ConfigError(
                f"save_pretrained(save_embedding_layers={save_embedding_layers!r}): deltatune saves adapter tensors "
                "only, never the base embedding weights; use 'auto' (the default) or False. To ship the full "
                "embeddings, train them with modules_to_save=[...] or save the merged model."
            )
        if state_dict is not None:
            raise ConfigError(
                "save_pretrained(state_dict=...) is not supported: a DeltaModel saves its own adapter tensors. "
                "Sharded (FSDP/DeepSpeed) training through transformers' Trainer cannot save adapters here; "
                "use 'deltatune train --fsdp', or gather the model on one rank first."
            )
        if not safe_serialization:
            raise ConfigError("deltatune writes adapters as safetensors only; drop safe_serialization=False.")
        if not is_main_process:
            return
        names = list(selected_adapters or self.peft_config)
        for name in names:
            self._check_known(name)
        for name in names:
            save_adapter(self.adapter_parts(name), name, Path(save_directory), self.base_fingerprint(name))
        write_model_card(Path(save_directory), self.peft_config[names[0]].base_model_name_or_path,
                         [self._summary(name) for name in names])

    def _summary(self, name: str) -> AdapterSummary:
        config = self.peft_config[name]
        spec = get_method(config)
        trainable = sum(p.numel() for p in self.adapter_parameters(name))
        total = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        return AdapterSummary(name, spec.name, spec.peft_type, config.task_type,
                              getattr(config, "target_modules", None), trainable, total)

    def load_adapter(
        self,
        model_id: str | Path,
        adapter_name: str,
        is_trainable: bool = False,
        ignore_base_mismatch: bool = False,
        allow_pickle: bool = False,
    ) -> None:
        """Load an adapter folder as a new adapter ``adapter_name`` (not activated).

        If ``adapter_name`` exists already (transformers' Trainer does this when it resumes from a
        checkpoint), the folder's tensors replace its values, after checking that the folder holds an
        adapter of the same layout; ``is_trainable=True`` then makes it trainable again.
        """
        folder = Path(model_id)
        config, tensors, fingerprint = read_adapter(folder, allow_pickle)
        config.inference_mode = not is_trainable
        check_base(self.get_base_model(), fingerprint, str(folder), ignore_base_mismatch, digests=self.base_digests)
        if adapter_name in self.peft_config:
            if not same_adapter_config(self.peft_config[adapter_name], config):
                raise CheckpointError(
                    f"{folder} holds a different adapter ({config.peft_type}, target_modules="
                    f"{getattr(config, 'target_modules', None)}) than this model's {adapter_name!r}; load it under "
                    "another adapter_name, or resume from a checkpoint of this same adapter."
                )
            apply_tensors(self.adapter_parts(adapter_name), adapter_name, tensors, str(folder))
            if is_trainable:
                self.peft_config[adapter_name].inference_mode = False
                self._refresh_trainable()
            return
        self.add_adapter(adapter_name, config)
        try:
            apply_tensors(self.adapter_parts(adapter_name), adapter_name, tensors, str(folder))
        except BaseException:
            self.delete_adapter(adapter_name)  # leave the model as it was
            raise

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        ignore_base_mismatch: bool = False,
        allow_pickle: bool = False,
        *,
        config: Any = None,
    ) -> Any:
        """Wrap ``model`` with the adapter saved in ``model_id`` (by deltatune or HF peft).

        ``config`` (HF peft's keyword: a deltatune or peft config object) replaces the folder's
        ``adapter_config.json``; the folder's tensors must fit it.
        """
        saved, tensors, fingerprint = read_adapter(Path(model_id), allow_pickle)
        config = copy.deepcopy(as_delta_config(config)) if config is not None else saved
        config.inference_mode = not is_trainable
        check_base(model, fingerprint, str(model_id), ignore_base_mismatch)
        requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        delta = cls(model, config, adapter_name)
        try:
            apply_tensors(delta.adapter_parts(adapter_name), adapter_name, tensors, str(model_id))
        except BaseException:
            unwrap(model)  # hand the caller's model back as it was
            release(model)
            for p in model.parameters():
                p.requires_grad_(requires_grad.get(id(p), p.requires_grad))
            raise
        if not is_trainable:
            delta.eval()
        return delta


def base_name_or_path(model: nn.Module) -> str | None:
    """Where ``model`` was loaded from (transformers' ``name_or_path``): a local folder as an absolute path,
    a hub id as it is; ``None`` for models that do not say (plain ``nn.Module``, built from a config)."""
    name = getattr(model, "name_or_path", None)
    if not isinstance(name, str) or not name:
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name

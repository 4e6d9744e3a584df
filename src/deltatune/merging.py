"""Merging adapters into the base weights, and undoing it: the part of :class:`~deltatune.model.DeltaModel`
that writes to the frozen model.

For a layer method with delta ``dW`` (LoRA: ``dW = s B A``), merging sets ``W <- W + dW`` in every wrapped
layer (through :mod:`deltatune.weights`, which dequantizes, adds and re-quantizes quantized bases) and
unmerging restores ``W``. Merges are all or nothing, refuse weights another module shares (tied
embeddings), and can be measured: :meth:`MergingMixin.verify_merge` compares logits merged vs unmerged on
a probe batch (:mod:`deltatune.merge_check`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from .config import DeltaConfig
from .errors import MergeError
from .inject import iter_wrappers, unwrap
from .integrations.adapter_saving import release
from .layer import DeltaLayer
from .merge_check import MergeReport, default_probe, measure_merge
from .registry import all_methods, get_method
from .weights import quantization


class MergingMixin:
    """Merge, unmerge, verify and unload for a model holding ``base_model``, ``peft_config`` and
    ``active_adapters`` (a :class:`~deltatune.model.DeltaModel`)."""

    get_base_model: Callable[[], nn.Module]
    peft_config: dict[str, DeltaConfig]
    active_adapters: list[str]
    merge_report: MergeReport

    def _check_known(self, name: str) -> None:  # provided by DeltaModel
        raise NotImplementedError

    def _check_mergeable(self, names: list[str]) -> None:
        for name in names:
            self._check_known(name)
            spec = get_method(self.peft_config[name])
            if not spec.mergeable:
                mergeable = [s.name for s in all_methods() if s.mergeable]
                raise MergeError(
                    f"Adapter {name!r} uses {spec.name} ({spec.peft_type}), which cannot be merged into the base "
                    f"weights; keep it unmerged (it still works), or use a mergeable method ({', '.join(mergeable)})."
                )

    def _check_untied(self, names: list[str]) -> None:
        """Refuse to merge into a weight another module shares (tied input/output embeddings, say):
        the merge would change that module too, and the merged model would compute something else."""
        owners: dict[int, list[str]] = {}
        for path, param in self.get_base_model().named_parameters(remove_duplicate=False):
            owners.setdefault(id(param), []).append(path)
        wrappers = list(iter_wrappers(self.get_base_model()))
        for path, wrapper in wrappers:
            if not isinstance(wrapper, DeltaLayer) or not any(n in wrapper.adapter_names for n in names):
                continue
            if getattr(wrapper, "merges_through", None) is not None:
                continue  # its weight is written by the wrapper it names, once
            # modules that merge through this wrapper share its weight on purpose (a tied output head)
            through = [p for p, w in wrappers if getattr(w, "merges_through", None) is wrapper]
            weight = getattr(wrapper.get_base_layer(), "weight", None)
            sharing = [p for p in owners.get(id(weight), [])
                       if not any(p.startswith(q + ".") for q in [path, *through])]
            if sharing:
                raise MergeError(
                    f"The weight of {path} is shared with {sharing} (tied weights); merging would change "
                    f"{'them' if len(sharing) > 1 else 'it'} too. Keep the adapter unmerged, or untie the weights "
                    "before adding the adapter (e.g. tie_word_embeddings=False); LoRA on a tied embedding can keep the tie "
                    "with ensure_weight_tying=True."
                )

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights; :meth:`unmerge_adapter` undoes it.

        All or nothing: if a layer fails (``safe_merge`` found NaN/inf, say), the layers merged by this
        call are unmerged again before the error is raised.
        """
        self._merge(list(adapter_names or self.active_adapters), safe_merge)

    def _merge(self, names: list[str], safe_merge: bool) -> list[tuple[DeltaLayer, int]]:
        """Merge ``names``; returns (layer, merges before) per layer, for :meth:`_undo_merge`."""
        self._check_mergeable(names)
        self._check_untied(names)
        done: list[tuple[DeltaLayer, int]] = []
        try:
            for _, wrapper in iter_wrappers(self.get_base_model()):
                if isinstance(wrapper, DeltaLayer):
                    done.append((wrapper, len(wrapper.merged_adapters)))
                    wrapper.merge([n for n in names if n in wrapper.adapter_names], safe=safe_merge)
        except BaseException:
            self._undo_merge(done)
            raise
        return done

    @staticmethod
    def _undo_merge(done: list[tuple[DeltaLayer, int]]) -> None:
        for wrapper, before in reversed(done):
            while len(wrapper.merged_adapters) > before:
                wrapper.unmerge_last()

    def verify_merge(
        self,
        adapter_names: list[str] | None = None,
        probe: Any = None,
        safe_merge: bool = False,
        max_logit_error: float | None = None,
    ) -> MergeReport:
        """Merge like :meth:`merge_adapter` and measure what it changed on a probe batch.

        The logits of the model with the adapters merged are compared with those of the same model
        unmerged (see :mod:`deltatune.merge_check`); the report is returned and kept in
        ``self.merge_report``. With ``max_logit_error``, a merge whose max logit difference is above it is
        undone (the model is left exactly as before) and :class:`MergeError` is raised.

        Args:
            probe: keyword arguments for the model (``{"input_ids": ...}``) or one input tensor; default:
                seeded random token ids of the model's vocabulary (transformers models).
        """
        report = measure_merge(self, list(adapter_names or self.active_adapters), probe, safe_merge, max_logit_error)
        self.merge_report = report
        return report

    def unmerge_adapter(self) -> None:
        """Restore the base weights by undoing every merge."""
        for _, wrapper in iter_wrappers(self.get_base_model()):
            if isinstance(wrapper, DeltaLayer):
                wrapper.unmerge()

    def merge_and_unload(
        self,
        adapter_names: list[str] | None = None,
        safe_merge: bool = False,
        *,
        probe: Any = None,
        max_logit_error: float | None = None,
        progressbar: bool = False,
    ) -> nn.Module:
        """Merge, then return the plain base model (trained task heads kept) with no wrappers left.

        ``progressbar`` is accepted for HF peft's signature and draws nothing (merging takes a moment).

        When the merge is measured (a ``probe`` or ``max_logit_error`` is given, or a merged layer is
        quantized) it goes through :meth:`verify_merge`: the report is in ``self.merge_report``, and a
        merge above ``max_logit_error`` is refused, leaving the model unchanged and still wrapped.
        """
        names = list(adapter_names or self.active_adapters)
        if probe is not None or max_logit_error is not None or self._merges_quantized(names):
            if probe is None and default_probe(self.get_base_model()) is None and max_logit_error is None:
                warnings.warn("merge_and_unload: merging into quantized layers without a probe batch, so the "
                              "merge error is not measured; pass probe=... to measure it.", stacklevel=2)
                self.merge_adapter(names, safe_merge)
            else:
                self.verify_merge(names, probe, safe_merge, max_logit_error)
        else:
            self.merge_adapter(names, safe_merge)
        unwrap(self.get_base_model(), keep_trained_copy=True)
        release(self.get_base_model())  # a plain model again: its own class, full save_pretrained
        return self.get_base_model()

    def _merges_quantized(self, names: list[str]) -> bool:
        return any(isinstance(w, DeltaLayer) and set(names) & set(w.adapter_names) and quantization(w.get_base_layer())
                   for _, w in iter_wrappers(self.get_base_model()))

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original base model."""
        self.unmerge_adapter()
        unwrap(self.get_base_model())
        release(self.get_base_model())
        return self.get_base_model()

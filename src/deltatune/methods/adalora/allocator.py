"""AdaLoRA's rank budget: importance scores, the cubic budget schedule, pruning, orthogonality.

Importance of a parameter entry (the paper's eq. 8-10): ``I = |p * grad|``, smoothed
``I_bar <- b1 I_bar + (1 - b1) I`` and its uncertainty ``U_bar <- b2 U_bar + (1 - b2) |I - I_bar|``,
score ``S = I_bar * U_bar``. A triplet ``i`` of a layer scores ``S(Lambda_i) + mean_j S(Q_ij) +
mean_j S(P_ji)``. The budget (triplets kept over all layers) stays at ``init_r * L`` for ``tinit``
steps, then falls as ``target + (init - target) (1 - t)^3`` over the pruning phase, reaching
``target_r * L`` ``tfinal`` steps before the end; every ``deltaT`` steps the lowest-scoring triplets
have their ``Lambda_i`` set to zero. During the last ``tfinal`` steps the final mask is re-applied.
The same schedule and scores as HF peft's ``RankAllocator``, so runs compare one to one.

The hook's state (the two averages per tensor and the kept-triplet masks) is saved with resumable
training checkpoints (``state_dict`` / ``load_state_dict``, see :mod:`deltatune.step_hooks`), so a
resumed run prunes exactly as an uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import CheckpointError, ConfigError
from ...inject import iter_wrappers
from .config import AdaLoraConfig
from .layer import AdaLoraLinear


class RankBudget:
    """The step hook of one AdaLoRA adapter (see :mod:`deltatune.step_hooks`)."""

    def __init__(self, config: AdaLoraConfig, model: nn.Module, name: str) -> None:
        self.config, self.name = config, name
        self.layers = {path: w for path, w in iter_wrappers(model)
                       if isinstance(w, AdaLoraLinear) and name in w.lora_E}
        self.initial = sum(w.lora_E[name].shape[0] for w in self.layers.values())
        self.target = config.target_r * len(self.layers)
        self.reset_scores()

    def reset_scores(self) -> None:
        self.avg_ipt: dict[str, torch.Tensor] = {}  # "<layer path>.<lora_A|lora_B|lora_E>" -> like the tensor
        self.avg_unc: dict[str, torch.Tensor] = {}

    def set_total_steps(self, total: int) -> None:
        """Take the loop's step count unless the config names one."""
        if self.config.total_step is None:
            self.config.check_schedule(total)
            self.config.total_step = total

    def _params(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{path}.{kind}", getattr(w, kind)[self.name]) for path, w in self.layers.items()
                for kind in ("lora_A", "lora_B", "lora_E")]

    # -- state kept across a resumed run ------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``ipt.<tensor>`` / ``unc.<tensor>``: the averages; ``kept.<layer path>``: the masks once pruned."""
        out = {f"ipt.{k}": v for k, v in self.avg_ipt.items()} | {f"unc.{k}": v for k, v in self.avg_unc.items()}
        for path, layer in self.layers.items():
            if layer.kept[self.name] is not None:
                out[f"kept.{path}"] = layer.kept[self.name]
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s output (checked whole before anything changes)."""
        params = dict(self._params())
        expected = {f"{kind}.{k}": p.shape for k, p in params.items() for kind in ("ipt", "unc")}
        expected |= {f"kept.{path}": w.lora_E[self.name].shape[:1] for path, w in self.layers.items()}
        wrong = sorted(k for k, v in state.items() if k not in expected or tuple(v.shape) != tuple(expected[k]))
        if wrong:
            raise CheckpointError(f"AdaLoRA adapter {self.name!r}: the saved rank-budget state does not fit this model "
                                  f"({wrong[:3]}...); resume with the options of the original run.")
        self.reset_scores()
        for key, tensor in state.items():
            kind, _, rest = key.partition(".")
            if kind == "kept":
                self.layers[rest].kept[self.name] = tensor.to(torch.bool)
            else:
                table = self.avg_ipt if kind == "ipt" else self.avg_unc
                table[rest] = tensor.to(device=params[rest].device, dtype=params[rest].dtype)
        if any(w.kept[self.name] is not None for w in self.layers.values()):
            self.config.rank_pattern = {
                f"{path}.lora_E": (w.kept[self.name] if w.kept[self.name] is not None
                                   else torch.ones(w.lora_E[self.name].shape[0], dtype=torch.bool)).tolist()
                for path, w in self.layers.items()}

    # -- before the optimizer step: orthogonality -------------------------------------------------
    def before_optimizer_step(self) -> None:
        """Add the gradient of ``w * mean(||Q Q^T - I||_F, ||P^T P - I||_F)`` over all ``P``, ``Q`` (the
        regulariser HF peft adds to the loss; added to the gradients here, so it is counted once per step)."""
        weight = self.config.orth_reg_weight
        if weight == 0 or not self.layers:
            return
        mats = [(w.lora_A[self.name], True) for w in self.layers.values()]
        mats += [(w.lora_B[self.name], False) for w in self.layers.values()]
        with torch.enable_grad():
            terms = []
            for p, rows in mats:
                gram = p @ p.T if rows else p.T @ p  # (r, r)
                terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=p.device, dtype=p.dtype)))
            reg = weight * torch.stack(terms).mean()
            grads = torch.autograd.grad(reg, [p for p, _ in mats], allow_unused=True)
        for (p, _), g in zip(mats, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    # -- after the optimizer step: scores, budget, pruning ------------------------------------------
    def _update_scores(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for key, p in self._params():
                if p.grad is None:
                    continue
                ipt = (p * p.grad).abs()
                if key not in self.avg_ipt:
                    self.avg_ipt[key], self.avg_unc[key] = torch.zeros_like(p), torch.zeros_like(p)
                self.avg_ipt[key] = b1 * self.avg_ipt[key] + (1 - b1) * ipt
                self.avg_unc[key] = b2 * self.avg_unc[key] + (1 - b2) * (ipt - self.avg_ipt[key]).abs()

    def _score(self, path: str, kind: str) -> torch.Tensor:
        key = f"{path}.{kind}"
        p = getattr(self.layers[path], kind)[self.name]
        return self.avg_ipt[key] * self.avg_unc[key] if key in self.avg_ipt else torch.zeros_like(p)

    def budget(self, step: int) -> tuple[int, bool]:
        """(triplets to keep, whether to prune at ``step``)."""
        c = self.config
        if step <= c.tinit:
            return self.initial, False
        if step > c.total_step - c.tfinal:
            return self.target, True
        left = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.initial - self.target) * left**3 + self.target), step % c.deltaT == 0

    def _triplet_scores(self) -> dict[str, torch.Tensor]:
        return {path: self._score(path, "lora_E").view(-1) + self._score(path, "lora_A").mean(dim=1)
                + self._score(path, "lora_B").mean(dim=0) for path in self.layers}  # (r,) each

    def prune_to(self, budget: int) -> None:
        """Zero ``Lambda`` of the lowest-scoring triplets so that (ties aside) ``budget`` stay; record the pattern."""
        scores = self._triplet_scores()
        drop = self.initial - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), drop).values.item() if drop > 0 else None
        pattern = {}
        with torch.no_grad():
            for path, layer in self.layers.items():
                kept = scores[path] > threshold if threshold is not None else torch.ones_like(scores[path], dtype=torch.bool)
                layer.lora_E[self.name].masked_fill_(~kept[:, None], 0.0)
                layer.kept[self.name] = kept
                pattern[f"{path}.lora_E"] = kept.tolist()
        self.config.rank_pattern = pattern

    def _reapply(self) -> None:
        with torch.no_grad():
            for layer in self.layers.values():
                kept = layer.kept[self.name]
                if kept is not None:
                    layer.lora_E[self.name].masked_fill_(~kept[:, None], 0.0)

    def after_optimizer_step(self, step: int) -> None:
        """Update scores and prune as the schedule says (HF peft's ``update_and_allocate(step)``)."""
        c = self.config
        if c.total_step is None:
            raise ConfigError("AdaLoRA needs total_step (the number of optimizer steps): set it in AdaLoraConfig, "
                              "or train with deltatune's loop or DeltaStepCallback, which set it.")
        end = c.total_step - c.tfinal
        if step < end:
            self._update_scores()
            budget, prune = self.budget(step)
            if prune:
                self.prune_to(budget)
        elif step == end:
            self.prune_to(self.budget(step)[0])
            self.reset_scores()
        else:
            self._reapply()


def make_rank_budget(config: AdaLoraConfig, model: nn.Module, name: str) -> RankBudget:
    """``MethodSpec.make_step_hook`` of AdaLoRA."""
    return RankBudget(config, model, name)


__all__ = ["RankBudget", "make_rank_budget"]

"""The method x model contract's table and checks, shared by ``test_contract.py`` and ``test_zoo.py``.

:data:`ROWS` holds one row per registered method (a tiny config factory and the cells where the method
cannot apply); :data:`FAMILIES` one column per tiny model. The ``check_*`` functions are the contract's
assertions, one job each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import model_output

import deltatune as dt
from deltatune.config import DeltaConfig

# kind (a tests/conftest.py model) -> (family, task_type)
FAMILIES: dict[str, tuple[str, str | None]] = {
    "bert_seq_cls": ("encoder", "SEQ_CLS"),
    "roberta_seq_cls": ("encoder", "SEQ_CLS"),
    "distilbert_seq_cls": ("encoder", "SEQ_CLS"),
    "gpt2_lm": ("decoder", "CAUSAL_LM"),
    "llama_lm": ("decoder", "CAUSAL_LM"),
    "t5": ("encoder-decoder", "SEQ_2_SEQ_LM"),
    "bart": ("encoder-decoder", "SEQ_2_SEQ_LM"),
    "mlp": ("plain nn.Module", None),
}
GENERATES = {"decoder", "encoder-decoder"}

Factory = Callable[[type, str, "str | None"], DeltaConfig]  # (config class, kind, task_type) -> config


@dataclass(frozen=True)
class Row:
    """One method (or variant) of the table.

    Attributes:
        method: registry name of the method.
        make: a tiny config for ``kind``.
        cannot: ``{kind: (error type, message regex, reason)}`` for cells where the method cannot apply.
        identity_start: the freshly added delta leaves the model's outputs unchanged.
    """

    method: str
    make: Factory
    cannot: dict[str, tuple[type[Exception], str, str]] = field(default_factory=dict)
    identity_start: bool = True


def _mlp(kind: str, targets: list[str]) -> list[str] | None:
    """Plain modules have no architecture table entry: layer methods name their targets there."""
    return targets if kind == "mlp" else None


NO_EMBEDDINGS = (dt.ConfigError, "has no get_input_embeddings",
                 "a plain nn.Module has no token embeddings for virtual tokens to be prepended to")
NO_KV_CACHE = (dt.TargetError, "takes no key/value cache",
               "the model's forward takes no key/value cache (past_key_values), so there is no place for prefixes")
NO_BIAS = (dt.TargetError, "has no bias", "Llama and T5 use bias=False in every linear and norm layer: BitFit has nothing to train")
NO_NORM = (dt.TargetError, "has no normalisation layer", "the plain MLP has no normalisation layer to tune")
ROWS: dict[str, Row] = {
    "lora": Row("lora", lambda c, k, t: c(r=2, lora_alpha=4, target_modules=_mlp(k, ["fc1", "fc2"]), task_type=t)),
    "dora": Row("lora", lambda c, k, t: c(r=2, use_dora=True, target_modules=_mlp(k, ["fc1", "fc2"]), task_type=t)),
    "ia3": Row("ia3", lambda c, k, t: c(target_modules=_mlp(k, ["fc1", "fc2"]), feedforward_modules=_mlp(k, ["fc2"]),
                                        task_type=t)),
    "bottleneck-houlsby": Row("bottleneck", lambda c, k, t: c(variant="houlsby", bottleneck_size=4,
                                                               target_modules=_mlp(k, ["fc1", "fc2"]), task_type=t)),
    "bottleneck-pfeiffer": Row("bottleneck", lambda c, k, t: c(variant="pfeiffer", bottleneck_size=4,
                                                                target_modules=_mlp(k, ["fc2"]), task_type=t)),
    "bottleneck-parallel": Row(
        "bottleneck",
        lambda c, k, t: c(variant="parallel", bottleneck_size=4, scaling=4.0, target_modules=_mlp(k, ["fc2"]), task_type=t)),
    "bitfit": Row("bitfit", lambda c, k, t: c(target_modules=_mlp(k, ["fc1", "fc2"]), task_type=t),
                  cannot={"llama_lm": NO_BIAS, "t5": NO_BIAS}),
    "ln_tuning": Row("ln_tuning", lambda c, k, t: c(task_type=t), cannot={"mlp": NO_NORM}),
    "loha": Row("loha", lambda c, k, t: c(r=2, alpha=4, target_modules=_mlp(k, ["fc1", "fc2"]), task_type=t)),
    "lokr": Row("lokr", lambda c, k, t: c(r=2, alpha=4, target_modules=_mlp(k, ["fc1", "fc2"]), task_type=t)),
    "vera": Row("vera", lambda c, k, t: c(r=4, target_modules=_mlp(k, ["fc1", "fc2"]), task_type=t)),
    "oft": Row("oft", lambda c, k, t: c(oft_block_size=4, target_modules=_mlp(k, ["fc1", "fc2"]), task_type=t)),
    "adalora": Row("adalora", lambda c, k, t: c(init_r=3, target_r=2, total_step=10, target_modules=_mlp(k, ["fc1", "fc2"]),
                                                task_type=t)),
    "prompt_tuning": Row("prompt_tuning", lambda c, k, t: c(num_virtual_tokens=3, task_type=t),
                         cannot={"mlp": NO_EMBEDDINGS}, identity_start=False),
    "p_tuning": Row("p_tuning", lambda c, k, t: c(num_virtual_tokens=3, encoder_hidden_size=8, task_type=t),
                    cannot={"mlp": NO_EMBEDDINGS}, identity_start=False),
    "prefix_tuning": Row("prefix_tuning", lambda c, k, t: c(num_virtual_tokens=3, task_type=t),
                         cannot={"mlp": NO_KV_CACHE}, identity_start=False),
}


def perturb(model: dt.DeltaModel) -> None:
    """Seeded noise on every delta tensor, so the delta is non-zero whatever the method's initialisation."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.adapter_parameters("default"):
            p.add_(0.2 * torch.randn(p.shape, generator=gen).to(p.dtype))


def real_positions(out: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``out`` without the positions of prepended virtual tokens (causal LMs return logits for them too)."""
    if out.dim() == 3 and out.shape[1] > reference.shape[1]:
        return out[:, -reference.shape[1]:]
    return out


def delta_loss(out: Any) -> torch.Tensor:
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return logits.float().pow(2).mean()


def check_gradients(model: dt.DeltaModel, inputs: dict[str, torch.Tensor]) -> None:
    delta_loss(model(**inputs)).backward()
    delta = {id(p) for p in model.adapter_parameters("default")}
    assert delta
    for name, p in model.named_parameters():
        if id(p) in delta:
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert not p.requires_grad and p.grad is None, f"frozen {name} got a gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.adapter_parameters("default"))


def check_step_keeps_base(model: dt.DeltaModel) -> None:
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    delta = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # a careless user: all parameters
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, delta[n]) for n, p in model.named_parameters() if n in delta)


def check_generate(model: dt.DeltaModel, kind: str, inputs: dict[str, torch.Tensor]) -> None:
    ids, mask = inputs["input_ids"][:1], inputs["attention_mask"][:1]
    kwargs = {"attention_mask": mask, "max_new_tokens": 3, "do_sample": False, "output_logits": True,
              "return_dict_in_generate": True, "pad_token_id": 0}
    with torch.no_grad():
        result = model.generate(input_ids=ids, **kwargs)
        with model.disable_adapter():
            base_result = model.generate(input_ids=ids, **kwargs)
        if FAMILIES[kind][0] == "encoder-decoder":
            start = torch.full((1, 1), model.config.decoder_start_token_id)
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits[:, -1]
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    assert result.sequences.shape[1] > (1 if FAMILIES[kind][0] == "encoder-decoder" else ids.shape[1])
    assert torch.allclose(result.logits[0], logits, atol=1e-4), "generate() did not use the delta"
    assert not torch.allclose(result.logits[0], base_result.logits[0], atol=1e-4), "delta had no effect on generate()"


def check_module_apply(model: dt.DeltaModel) -> None:
    """``nn.Module.apply(fn)`` (what transformers' weight init and users' custom init call) visits every
    module once; no deltatune class may shadow it."""
    visited: list[int] = []
    model.apply(lambda m: visited.append(id(m)))
    assert sorted(visited) == sorted(id(m) for m in model.modules())


def check_merge(model: dt.DeltaModel, method: str, inputs: dict[str, torch.Tensor], expected: torch.Tensor) -> None:
    """Mergeable methods fold in and out with the same outputs; the others refuse, naming the method."""
    if not dt.get_method(method).mergeable:
        with pytest.raises(dt.MergeError, match=method):
            model.merge_adapter()
        return
    model.merge_adapter()
    assert (model_output(model, inputs) - expected).abs().max() <= 1e-5
    model.unmerge_adapter()
    assert (model_output(model, inputs) - expected).abs().max() <= 1e-5

"""Shared steps of the mixed-adapter batch tests: build a model holding several adapters, and check a mixed
batch (``adapter_names=[...]``) against each adapter run alone."""

from __future__ import annotations

from typing import Any

import torch

import deltatune as dt

BASE = "__base__"


def build(make_model: Any, kind: str, configs: dict[str, Any]) -> dt.DeltaModel:
    names = iter(configs)
    first = next(names)
    model = dt.get_delta_model(make_model(kind), configs[first], first)
    for name in names:
        model.add_adapter(name, configs[name])
    return model.eval()


def logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def solo(model: dt.DeltaModel, name: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``inputs`` through adapter ``name`` alone (the base model for ``"__base__"``)."""
    with torch.no_grad():
        if name == BASE:
            with model.disable_adapter():
                return logits(model(**inputs))
        model.set_adapter(name)
        return logits(model(**inputs))


def assert_mixed_equals_solo(model: dt.DeltaModel, inputs: dict[str, torch.Tensor], names: list[str]) -> None:
    with torch.no_grad():
        mixed = logits(model(**inputs, adapter_names=names))
    base = solo(model, BASE, inputs)
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        ref = solo(model, name, {k: v[rows] for k, v in inputs.items()})
        got = mixed[rows]
        if got.dim() >= 3 and got.shape[1] != ref.shape[1]:  # decoder-only + virtual tokens: padding in front
            got = got[:, -ref.shape[1] :]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=f"adapter {name}")
        if name != BASE:  # the adapter really acts: a skipped adapter would look like the base
            assert (ref[..., -base.shape[1] :, :] if ref.dim() >= 3 else ref).sub(base[rows]).abs().max() > 1e-4, name


def lora(r: int, alpha: float, **kw: Any) -> dt.LoraConfig:
    return dt.LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", init_lora_weights=False, **kw)


def perturbed(model: dt.DeltaModel) -> dt.DeltaModel:
    """Every adapter tensor moved away from its initial value (some methods start as the identity)."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in model.peft_config:
            for p in model.adapter_parameters(name):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def solo_generate(model: dt.DeltaModel, name: str, ids: torch.Tensor, gen: dict[str, Any]) -> torch.Tensor:
    """``generate`` on ``ids`` with adapter ``name`` alone (the base model for ``"__base__"``)."""
    with torch.no_grad():
        if name == BASE:
            with model.disable_adapter():
                return model.generate(input_ids=ids, **gen)
        model.set_adapter(name)
        return model.generate(input_ids=ids, **gen)


def assert_generate_mixed_equals_solo(model: dt.DeltaModel, ids: torch.Tensor, names: list[str],
                                      gen: dict[str, Any]) -> None:
    """``generate(adapter_names=names)`` equals, row by row, each row's adapter generating alone; a row's
    ``num_return_sequences`` outputs sit together, and a shorter solo output is a prefix of the mixed row."""
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **gen)
    per = mixed.shape[0] // len(names)
    for i, name in enumerate(names):
        ref = solo_generate(model, name, ids[i : i + 1], gen)
        assert torch.equal(mixed[i * per : (i + 1) * per, : ref.shape[1]], ref), (name, gen)


def assert_row_gradient_is_its_adapters(model: dt.DeltaModel, inputs: dict[str, torch.Tensor], names: list[str],
                                        row: int, adapters: list[str], *, every_tensor: bool = True,
                                        atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """A loss on row ``row`` of a mixed batch alone reaches only that row's adapter (every one of its tensors, or
    with ``every_tensor=False`` at least one), and its gradients equal those of the row run alone with its
    adapter. ``adapters`` are active again afterwards."""
    name = names[row]
    model.zero_grad()
    logits(model(**inputs, adapter_names=names))[row].pow(2).sum().backward()
    reached = all if every_tensor else any
    for other in adapters:
        grads = [p.grad for p in model.adapter_parameters(other)]
        if other == name:
            assert reached(g is not None and g.abs().sum() > 0 for g in grads), other
        else:
            assert all(g is None or g.abs().sum() == 0 for g in grads), (name, other)
    mixed = [p.grad.clone() for p in model.adapter_parameters(name)]
    model.zero_grad()
    model.set_adapter(name)
    logits(model(**{k: v[row : row + 1] for k, v in inputs.items()}))[0].pow(2).sum().backward()
    for got, want in zip(mixed, [p.grad for p in model.adapter_parameters(name)]):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=name)
    model.set_adapter(list(adapters))

"""The method x model contract, one table parametrized from the registry.

Every registered method has a row in :data:`ROWS` (a tiny config factory, plus the cells where the
method cannot apply, each with the error it must raise and the reason). Every model family has a
column in :data:`FAMILIES`. Each cell checks, on tiny random-init models:

* the delta starts as the method promises (equal to the base where it promises identity);
* forward and backward run; only the delta (and modules_to_save) receive gradients;
* the frozen weights are bit-identical after an optimizer step over *all* parameters;
* save -> load onto a fresh copy of the base gives the same outputs;
* mergeable methods merge and unmerge with the same outputs (<= 1e-5); the others raise
  ``MergeError`` naming the method;
* causal / seq2seq models ``generate()`` with the delta active: the first step's logits equal the
  delta model's forward logits and differ from the base model's.

Adding a method = registering it + adding a row to ``_contract_checks.ROWS`` (an assertion checks that every registered
method has one).
"""

from __future__ import annotations

import pytest
import torch
from _contract_checks import (
    FAMILIES,
    GENERATES,
    ROWS,
    check_generate,
    check_gradients,
    check_merge,
    check_module_apply,
    check_step_keeps_base,
    perturb,
    real_positions,
)
from conftest import model_output, tiny_inputs, tiny_model

import deltatune as dt

REGISTERED = {spec.name for spec in dt.all_methods()}
CELLS = [(row, kind) for row in ROWS if ROWS[row].method in REGISTERED for kind in FAMILIES]


def test_every_registered_method_has_a_row() -> None:
    missing = REGISTERED - {row.method for row in ROWS.values()}
    assert not missing, f"registered methods without a contract row: {sorted(missing)}; add them to ROWS"


@pytest.mark.parametrize(("row", "kind"), CELLS, ids=[f"{r}-{k}" for r, k in CELLS])
def test_contract(row: str, kind: str, tmp_path) -> None:
    spec = ROWS[row]
    family, task_type = FAMILIES[kind]
    config = spec.make(dt.get_method(spec.method).config_cls, kind, task_type)
    base = tiny_model(kind)
    if kind in spec.cannot:
        error, pattern, _reason = spec.cannot[kind]
        before = {n: p.clone() for n, p in base.state_dict().items()}
        with pytest.raises(error, match=pattern):
            dt.get_delta_model(base, config)
        assert base.state_dict().keys() == before.keys()  # nothing was left wrapped
        return
    inputs = tiny_inputs(kind)
    reference = model_output(tiny_model(kind), inputs)
    model = dt.get_delta_model(base, config)
    if spec.identity_start:
        assert torch.equal(model_output(model, inputs), reference)
    check_module_apply(model)
    perturb(model)
    assert not torch.allclose(real_positions(model_output(model, inputs), reference), reference, atol=1e-5)
    check_gradients(model, inputs)
    check_step_keeps_base(model)
    model.zero_grad(set_to_none=True)
    expected = model_output(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(tiny_model(kind), tmp_path)
    assert torch.allclose(model_output(loaded, inputs), expected, atol=1e-6, rtol=0)
    check_merge(model, spec.method, inputs, expected)
    if family in GENERATES:
        check_generate(model, kind, inputs)

"""The contract over the zoo: every method with its *default* targets on tiny models of many transformers families.

Families (:data:`_zoo.FAMILIES`, built offline from their default configs, shrunk): decoders, mixture-of-experts
decoders, encoders and encoder-decoders, none of which needs a table entry: defaults come from the
structure (:mod:`deltatune.model_interface`). Each cell checks, from a non-zero delta:

* one optimizer step (over *all* parameters, weight decay on) changes the delta and nothing else;
* save -> load onto a fresh base reproduces the outputs;
* mergeable methods: merge gives the same outputs, unmerge gives the base back (adapter disabled = base);
* generative families: ``generate()`` runs with the delta and its first step equals the forward.

Cells where a method cannot apply are listed in :data:`UNSUPPORTED` with the error a user sees and why;
README's method table is written from it. Cost: :data:`FULL_ZOO_ROWS` (LoRA for the attention roles,
parallel adapters for the feed-forward block, prefix and prompt tuning for the two input paths) run on
every family; every registered method runs on :data:`SUBSET` (one family per structure kind).
``DELTATUNE_ZOO_ALL=1`` runs every method on every family.
"""

from __future__ import annotations

import os

import pytest
import torch
from _contract_checks import ROWS, check_step_keeps_base, perturb, real_positions
from _zoo import FAMILIES, tiny_inputs, tiny_model
from conftest import model_output

import deltatune as dt

FULL_ZOO_ROWS = ("lora", "bottleneck-parallel", "prefix_tuning", "prompt_tuning")
if os.environ.get("DELTATUNE_ZOO_ALL"):  # every method on every family (~1,200 cells; not run in CI)
    FULL_ZOO_ROWS = tuple(ROWS)
SUBSET = ("llama", "gpt2", "gpt_neox", "mixtral", "bert", "distilbert", "t5", "bart")

NO_CACHE = (dt.TargetError, "takes no key/value cache|do not read the key/value cache",
            "the attention takes no key/value cache and does not go through transformers' attention interface")
NO_BIAS = (dt.TargetError, "has no bias", "every linear and norm layer is bias-free: BitFit has nothing to train")
NO_NORM = (dt.TargetError, "has no normalisation layer", "OLMo's layer norms have no learnable scale or shift")
#: families whose linear and norm layers are all bias-free (the contract runs BitFit on them only with
#: DELTATUNE_ZOO_ALL=1, except llama, mixtral and t5, which are in SUBSET)
BIAS_FREE = ("llama", "mistral", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "cohere", "olmo", "olmo2",
             "granite", "helium", "smollm3", "mpt", "mixtral", "qwen3_moe", "olmoe", "granitemoe", "llama4_text",
             "t5", "mt5", "umt5", "longt5", "switch_transformers")
NO_PREFIXED_MASK = (dt.TargetError, "refuses an attention mask that covers cached positions",
                    ("the model asserts its attention mask is as long as the input, so cached prefix positions "
                     "cannot be attended to"))
#: (row, family) -> (error, message regex, why): get_delta_model refuses, before changing anything
UNSUPPORTED: dict[tuple[str, str], tuple[type[Exception], str, str]] = {
    ("prefix_tuning", "flaubert"): NO_PREFIXED_MASK,
    **{("bitfit", f): NO_BIAS for f in BIAS_FREE},
    ("ln_tuning", "olmo"): NO_NORM,
    **{("prefix_tuning", f): NO_CACHE
       for f in ("deberta", "deberta-v2", "mpnet", "megatron-bert", "openai-gpt")},
}
NO_EMBEDS_GENERATE = (dt.ConfigError, "cannot start from input embeddings",
                      "the model's generate() cannot start from input embeddings; forward and training work")
#: (row, family) -> (error, message regex, why): everything works except generate()
NO_GENERATE: dict[tuple[str, str], tuple[type[Exception], str, str]] = {
    (row, f): NO_EMBEDS_GENERATE for row in ("prompt_tuning", "p_tuning") for f in ("ctrl", "openai-gpt")
}

REGISTERED = {spec.name for spec in dt.all_methods()}
CELLS = sorted({(row, fam) for row in FULL_ZOO_ROWS for fam in FAMILIES}
               | {(row, fam) for row in ROWS if ROWS[row].method in REGISTERED for fam in SUBSET})


def _check_gradients(model: dt.DeltaModel, inputs: dict[str, torch.Tensor], moe: bool) -> None:
    """Only delta tensors get gradients; every one does (MoE: experts no token was routed to may get none)."""
    logits = model(**inputs).logits
    logits.float().pow(2).mean().backward()
    delta = {id(p) for p in model.adapter_parameters("default")}
    for name, p in model.named_parameters():
        if id(p) in delta:
            assert p.requires_grad and (moe or p.grad is not None), name
            assert p.grad is None or torch.isfinite(p.grad).all(), name
        else:
            assert not p.requires_grad and p.grad is None, f"frozen {name} got a gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter_parameters("default"))


def _check_generate(model: dt.DeltaModel, family: str, inputs: dict[str, torch.Tensor]) -> None:
    ids, mask = inputs["input_ids"][:1], inputs["attention_mask"][:1]
    kwargs = {"attention_mask": mask, "max_new_tokens": 2, "do_sample": False, "output_logits": True,
              "return_dict_in_generate": True, "pad_token_id": 0}
    encoder_decoder = FAMILIES[family].kind == "encoder-decoder"
    with torch.no_grad():
        result = model.generate(input_ids=ids, **kwargs)
        if encoder_decoder:
            start = torch.full((1, 1), model.config.decoder_start_token_id)
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits[:, -1]
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    assert result.sequences.shape[1] > (1 if encoder_decoder else ids.shape[1])
    assert torch.allclose(result.logits[0], logits, atol=1e-4), "generate() did not use the delta"


def _check_merge_returns_base(model: dt.DeltaModel, method: str, inputs: dict, expected: torch.Tensor,
                              base: torch.Tensor) -> None:
    if not dt.get_method(method).mergeable:
        with pytest.raises(dt.MergeError, match=method):
            model.merge_adapter()
        return
    model.merge_adapter()
    assert (model_output(model, inputs) - expected).abs().max() <= 1e-4
    model.unmerge_adapter()
    with model.disable_adapter():
        assert (model_output(model, inputs) - base).abs().max() <= 1e-4


@pytest.mark.parametrize(("row", "family"), CELLS, ids=[f"{r}-{f}" for r, f in CELLS])
def test_zoo(row: str, family: str, tmp_path) -> None:
    spec, fam = ROWS[row], FAMILIES[family]
    config = spec.make(dt.get_method(spec.method).config_cls, family, fam.task_type)
    base = tiny_model(family)
    if (row, family) in UNSUPPORTED:
        error, pattern, _why = UNSUPPORTED[(row, family)]
        keys = set(base.state_dict())
        with pytest.raises(error, match=pattern):
            dt.get_delta_model(base, config)
        assert set(base.state_dict()) == keys  # nothing was left wrapped
        return
    inputs = tiny_inputs(family)
    reference = model_output(base, inputs)
    model = dt.get_delta_model(base, config)
    if spec.identity_start:
        assert torch.allclose(model_output(model, inputs), reference, atol=1e-6)
    perturb(model)
    assert not torch.allclose(real_positions(model_output(model, inputs), reference), reference, atol=1e-5)
    _check_gradients(model, inputs, fam.moe)
    check_step_keeps_base(model)
    model.zero_grad(set_to_none=True)
    expected = model_output(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(tiny_model(family), tmp_path)
    assert torch.allclose(model_output(loaded, inputs), expected, atol=1e-5, rtol=0)
    _check_merge_returns_base(model, spec.method, inputs, expected, reference)
    if (row, family) in NO_GENERATE:
        error, pattern, _why = NO_GENERATE[(row, family)]
        with pytest.raises(error, match=pattern):
            _check_generate(model, family, inputs)
    elif fam.generates:
        _check_generate(model, family, inputs)

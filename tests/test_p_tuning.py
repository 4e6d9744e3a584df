"""P-tuning (Liu et al., arXiv 2103.10385): virtual tokens produced by an MLP or BiLSTM prompt encoder.

The encoder output is checked against the formula written out here; the saved form (HF peft's) is
the encoder output, which reloads exactly, for inference and for further training.
"""

from __future__ import annotations

import pytest
import torch
from _input_methods import GENERATIVE, TASK, check_save_load, check_training_step, greedy, main_output
from conftest import tiny_inputs, tiny_model
from safetensors.torch import load_file

import deltatune as dt

P = 4
FAMILIES = ("bert_seq_cls", "roberta_seq_cls", "distilbert_seq_cls", "gpt2_lm", "llama_lm", "t5", "bart")


def p_model(kind: str, **options: object) -> dt.DeltaModel:
    options.setdefault("encoder_hidden_size", 16)
    config = dt.PTuningConfig(task_type=TASK[kind], num_virtual_tokens=P, **options)
    return dt.get_delta_model(tiny_model(kind), config).eval()


def delta_of(model: dt.DeltaModel) -> torch.nn.Module:
    return model.input_deltas["default"]


def test_mlp_encoder_is_the_relu_chain_and_honours_encoder_num_layers() -> None:
    model = p_model("gpt2_lm", encoder_num_layers=3)
    delta = delta_of(model)
    linears = [m for m in delta.table.head if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(16, 32), (16, 16), (16, 16), (32, 16)]
    h = delta.table.embedding.weight  # (P, D)
    for layer in linears[:-1]:
        h = torch.relu(h @ layer.weight.T + layer.bias)
    expected = h @ linears[-1].weight.T + linears[-1].bias
    torch.testing.assert_close(delta.prompts(), expected)
    # ... and that is what the frozen model reads, in front of the token embeddings
    ids = tiny_inputs("gpt2_lm")["input_ids"]
    base = tiny_model("gpt2_lm")
    embeds = torch.cat([expected.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    torch.testing.assert_close(main_output(model, {"input_ids": ids}), main_output(base, {"inputs_embeds": embeds}))


def test_lstm_encoder_is_bidirectional() -> None:
    model = p_model("llama_lm", encoder_reparameterization_type="LSTM")
    delta = delta_of(model)
    assert delta.table.head.lstm_head.bidirectional
    before = delta.prompts().detach()
    with torch.no_grad():
        delta.table.embedding.weight[-1] += 1.0  # change only the last virtual token's input
    after = delta.prompts().detach()
    assert not torch.allclose(before[0], after[0])  # the first output sees the last input (backward direction)


def test_saved_form_is_the_encoder_output_and_reloads_exactly(tmp_path) -> None:
    model = p_model("gpt2_lm", encoder_reparameterization_type="LSTM")
    inputs = tiny_inputs("gpt2_lm")
    check_training_step(model, "gpt2_lm", inputs)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(saved) == {"prompt_embeddings"}
    torch.testing.assert_close(saved["prompt_embeddings"], delta_of(model).prompts().detach())
    expected = main_output(model, inputs)

    loaded = dt.DeltaModel.from_pretrained(tiny_model("gpt2_lm"), tmp_path)
    assert delta_of(loaded).table.head is None  # no encoder needed (nor stored) to use the prompt
    torch.testing.assert_close(main_output(loaded, inputs), expected, atol=1e-6, rtol=0)
    assert loaded.trainable_parameters()[0] == 0

    resumed = dt.DeltaModel.from_pretrained(tiny_model("gpt2_lm"), tmp_path, is_trainable=True)
    assert delta_of(resumed).table.head is None
    torch.testing.assert_close(main_output(resumed, inputs), expected, atol=1e-6, rtol=0)
    assert resumed.trainable_parameters()[0] == P * 32  # the prompt itself now trains (as prompt tuning)
    check_training_step(resumed, "gpt2_lm", inputs)


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_trains_only_table_and_encoder_and_reloads(kind: str, tmp_path) -> None:
    model = p_model(kind)
    check_training_step(model, kind, tiny_inputs(kind))
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n}
    assert "input_deltas.default.table.embedding.weight" in trained
    assert any(".table.head." in n for n in trained)
    inputs = tiny_inputs(kind)
    inputs["attention_mask"][1, :2] = 0
    check_save_load(model, tiny_model(kind), inputs, tmp_path)
    if kind in GENERATIVE:
        assert greedy(model, tiny_inputs(kind)).shape[1] in (5, 7 + 4)


def test_merge_is_refused_naming_the_method() -> None:
    with pytest.raises(dt.MergeError, match="p_tuning"):
        p_model("llama_lm").merge_adapter()


def test_bad_configs_say_what_is_wrong() -> None:
    with pytest.raises(dt.ConfigError, match="encoder_reparameterization_type"):
        dt.PTuningConfig(encoder_reparameterization_type="GRU")
    with pytest.raises(dt.ConfigError, match="encoder_num_layers"):
        dt.PTuningConfig(encoder_num_layers=0)
    with pytest.raises(dt.ConfigError, match="encoder_dropout"):
        dt.PTuningConfig(encoder_dropout=1.0)
    with pytest.raises(dt.ConfigError, match="encoder_hidden_size"):
        dt.PTuningConfig(encoder_hidden_size=-3)
    with pytest.raises(dt.ConfigError, match="get_input_embeddings"):
        dt.get_delta_model(tiny_model("mlp"), dt.PTuningConfig())
    config = dt.PTuningConfig(encoder_reparameterization_type="lstm")  # case-insensitive, saved as peft spells it
    assert config.to_dict()["encoder_reparameterization_type"] == "LSTM"

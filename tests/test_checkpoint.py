"""Adapter folders: the base-model fingerprint, bad input, pickle refusal, atomic saves, failed loads."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

import deltatune as dt
from deltatune.fingerprint import FINGERPRINT_KEY

CFG = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "init_lora_weights": False}


def saved_adapter(make_model, folder: Path, kind: str = "bert", seed: int = 0, **overrides) -> torch.Tensor:
    """Save a non-zero adapter made on ``make_model(kind, seed)`` into ``folder``; returns its output."""
    model = dt.get_delta_model(make_model(kind, seed=seed), dt.LoraConfig(**(CFG | overrides)))
    model.save_pretrained(folder)
    return make_model.output(model, make_model.inputs(kind))


def structure(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules()]


# -- fingerprint -------------------------------------------------------------------------------


def test_fingerprint_is_saved_and_checked(make_model, tmp_path) -> None:
    expected = saved_adapter(make_model, tmp_path)
    # In the safetensors header, where HF peft does not look; adapter_config.json holds only peft's fields.
    assert FINGERPRINT_KEY not in json.loads((tmp_path / "adapter_config.json").read_text())
    with safetensors.safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        saved = json.loads(handle.metadata()[FINGERPRINT_KEY])
    assert saved["architecture"] == "BertModel" and saved["model_type"] == "bert"
    assert saved["target_shapes"]["encoder.layer.0.attention.self.query"] == [32, 32]
    loaded = dt.DeltaModel.from_pretrained(make_model("bert", seed=0), tmp_path)
    torch.testing.assert_close(make_model.output(loaded, make_model.inputs("bert")), expected, atol=1e-6, rtol=0)
    assert loaded.trainable_parameters()[0] == 0 and not loaded.training  # is_trainable=False: inference only
    trainable = dt.DeltaModel.from_pretrained(make_model("bert", seed=0), tmp_path, is_trainable=True)
    assert trainable.trainable_parameters()[0] == 2 * 2 * (4 * 32 + 32 * 4)


def test_fingerprint_in_old_config_key_is_still_checked(make_model, tmp_path) -> None:
    """Folders saved before the fingerprint moved keep it in adapter_config.json; it is still honoured."""
    saved_adapter(make_model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    with safetensors.safe_open(str(weights), "pt") as handle:
        fingerprint = json.loads(handle.metadata()[FINGERPRINT_KEY])
    safetensors.torch.save_file(safetensors.torch.load_file(weights), weights, metadata={"format": "pt"})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {FINGERPRINT_KEY: fingerprint}))
    with pytest.raises(dt.BaseModelMismatchError, match="different weights"):
        dt.DeltaModel.from_pretrained(make_model("bert", seed=1), tmp_path)
    assert "default" in dt.DeltaModel.from_pretrained(make_model("bert", seed=0), tmp_path).peft_config


def test_other_weights_raise_unless_overridden(make_model, tmp_path) -> None:
    saved_adapter(make_model, tmp_path)
    other = make_model("bert", seed=1)
    before = structure(other)
    with pytest.raises(dt.BaseModelMismatchError, match="different weights.*ignore_base_mismatch=True"):
        dt.DeltaModel.from_pretrained(other, tmp_path)
    assert structure(other) == before  # nothing was wrapped
    model = dt.DeltaModel.from_pretrained(other, tmp_path, ignore_base_mismatch=True)
    assert "default" in model.peft_config


def test_other_shapes_raise_then_shape_error_when_forced(make_model, tmp_path) -> None:
    from transformers import BertConfig, BertModel

    saved_adapter(make_model, tmp_path)
    wider = BertModel(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=37, max_position_embeddings=64))
    with pytest.raises(dt.BaseModelMismatchError, match=r"weight shape \[32, 32\] at training"):
        dt.DeltaModel.from_pretrained(wider, tmp_path)
    with pytest.raises(dt.CheckpointError, match="shape mismatches.*file \\(4, 32\\) vs model \\(4, 48\\)"):
        dt.DeltaModel.from_pretrained(wider, tmp_path, ignore_base_mismatch=True)
    assert not any(type(m).__name__ == "LoraLinear" for m in wider.modules())  # handed back unwrapped


def test_other_architecture_raises(make_model, tmp_path) -> None:
    saved_adapter(make_model, tmp_path, kind="bert_seq_cls", task_type="SEQ_CLS")
    with pytest.raises(dt.BaseModelMismatchError, match="architecture.*BertForSequenceClassification"):
        dt.DeltaModel.from_pretrained(make_model("roberta_seq_cls"), tmp_path)


def test_reinitialised_seq_cls_head_is_not_a_mismatch(make_model, output_of, train, tmp_path) -> None:
    """The head of a SEQ_CLS model is new at every load; it is saved with the adapter and left out of the hash."""
    from transformers import AutoModelForSequenceClassification

    make_model("bert", seed=0).save_pretrained(tmp_path / "base")  # an encoder without a classifier

    def fresh(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3).eval()

    assert not torch.equal(fresh(1).classifier.weight, fresh(2).classifier.weight)
    inputs = make_model.inputs("bert_seq_cls")
    model = dt.get_delta_model(fresh(1), dt.LoraConfig(**CFG, task_type="SEQ_CLS"))
    train(model, inputs, steps=2)
    expected = output_of(model.eval(), inputs)
    model.save_pretrained(tmp_path / "adapter")
    loaded = dt.DeltaModel.from_pretrained(fresh(2), tmp_path / "adapter")
    torch.testing.assert_close(output_of(loaded, inputs), expected, atol=1e-6, rtol=0)

    # A head that only a later adapter saves is left out of that adapter's fingerprint as well.
    model = dt.get_delta_model(fresh(3), dt.LoraConfig(**CFG))  # no task type: the head is a base weight here
    model.add_adapter("cls", dt.LoraConfig(**CFG, task_type="SEQ_CLS"))
    model.set_adapter("cls")
    expected = output_of(model, inputs)
    model.save_pretrained(tmp_path / "two")
    loaded = dt.DeltaModel.from_pretrained(fresh(4), tmp_path / "two" / "cls")
    torch.testing.assert_close(output_of(loaded, inputs), expected, atol=1e-6, rtol=0)
    with pytest.raises(dt.BaseModelMismatchError):  # the first adapter did count the (random) head
        dt.DeltaModel.from_pretrained(fresh(4), tmp_path / "two")


def test_load_adapter_onto_merged_model_uses_the_original_fingerprint(make_model, output_of, tmp_path) -> None:
    inputs = make_model.inputs("bert")
    expected = saved_adapter(make_model, tmp_path / "b", lora_alpha=3)
    model = dt.get_delta_model(make_model("bert"), dt.LoraConfig(**CFG))
    model.merge_adapter()  # the base weights now differ from the model "b" was trained on
    model.load_adapter(tmp_path / "b", "b")
    model.unmerge_adapter()
    model.set_adapter("b")
    torch.testing.assert_close(output_of(model, inputs), expected, atol=1e-5, rtol=0)


# -- bad input ---------------------------------------------------------------------------------


def test_missing_folder_and_files(make_model, tmp_path) -> None:
    with pytest.raises(dt.CheckpointError, match="No adapter_config.json"):
        dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path / "nowhere")
    saved_adapter(make_model, tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(dt.CheckpointError, match="No adapter_model.safetensors"):
        dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_truncated_or_corrupt_safetensors(damage, make_model, tmp_path) -> None:
    saved_adapter(make_model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage])
    with pytest.raises(dt.CheckpointError, match="truncated or corrupt"):
        dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path)


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text()) | changes
    path.write_text(json.dumps(data))


def test_invalid_json_and_unknown_peft_type(make_model, tmp_path) -> None:
    saved_adapter(make_model, tmp_path)
    edit_config(tmp_path, peft_type="SUPERLORA")
    with pytest.raises(dt.ConfigError, match="SUPERLORA.*Known methods.*lora"):
        dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(dt.CheckpointError, match="not valid JSON"):
        dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path)


def test_unknown_config_fields_warn_and_load(make_model, output_of, tmp_path) -> None:
    expected = saved_adapter(make_model, tmp_path)
    edit_config(tmp_path, lora_future_trick=3, use_qalora=False, peft_version="9.9")
    with pytest.warns(UserWarning, match="lora_future_trick") as record:
        model = dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path)
    assert not any("use_qalora" in str(w.message) or "peft_version" in str(w.message) for w in record)
    torch.testing.assert_close(output_of(model, make_model.inputs("bert")), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rank", [0, -1])
def test_bad_rank_in_file(rank, make_model, tmp_path) -> None:
    saved_adapter(make_model, tmp_path)
    edit_config(tmp_path, r=rank)
    with pytest.raises(dt.ConfigError, match=f"adapter_config.json.*positive integer.*r={rank}"):
        dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path)


def test_shape_mismatch_and_missing_or_extra_tensors(make_model, tmp_path) -> None:
    saved_adapter(make_model, tmp_path)
    edit_config(tmp_path, r=8)
    with pytest.raises(dt.CheckpointError, match=r"shape mismatches .*lora_A.weight: file \(4, 32\) vs model \(8, 32\)"):
        dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path)
    edit_config(tmp_path, r=4)
    path = tmp_path / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    key = min(tensors)
    extra = {k: v for k, v in tensors.items() if k != key} | {"base_model.model.nothing.lora_A.weight": tensors[key]}
    safetensors.torch.save_file(extra, path)
    with pytest.raises(dt.CheckpointError, match="1 tensors missing.*1 tensors in the file match nothing"):
        dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path)


class NotATensor:
    """A pickled object that ``torch.load(weights_only=True)`` must refuse to build."""


def test_pickled_weights_refused_unless_allowed(make_model, output_of, tmp_path) -> None:
    expected = saved_adapter(make_model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    torch.save(safetensors.torch.load_file(path), tmp_path / "adapter_model.bin")
    path.unlink()
    with pytest.raises(dt.CheckpointError, match="pickled adapter_model.bin.*allow_pickle=True"):
        dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path)
    model = dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path, allow_pickle=True)
    torch.testing.assert_close(output_of(model, make_model.inputs("bert")), expected, atol=1e-6, rtol=0)
    # weights_only=True: a pickle holding arbitrary objects is refused even when pickles are allowed.
    torch.save({"x": NotATensor()}, tmp_path / "adapter_model.bin")
    with pytest.raises(dt.CheckpointError, match="cannot be read safely"):
        dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path, allow_pickle=True)


# -- atomic saves and failed loads ---------------------------------------------------------------


def test_interrupted_save_keeps_the_earlier_adapter(make_model, output_of, train, tmp_path, monkeypatch) -> None:
    inputs = make_model.inputs("bert")
    model = dt.get_delta_model(make_model("bert"), dt.LoraConfig(**CFG))
    first = output_of(model, inputs)
    model.save_pretrained(tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    train(model, inputs, steps=2)
    model.eval()
    real_save = safetensors.torch.save_file

    def crash_half_way(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])  # half a file on disk ...
        raise OSError("disk full")  # ... and then the crash

    monkeypatch.setattr(safetensors.torch, "save_file", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files  # no temp files, nothing changed
    loaded = dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path)
    torch.testing.assert_close(output_of(loaded, inputs), first, atol=1e-6, rtol=0)
    # A save that completes replaces both files.
    model.save_pretrained(tmp_path)
    reloaded = dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path)
    torch.testing.assert_close(output_of(reloaded, inputs), output_of(model, inputs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("problem", ["missing_tensor", "bad_target", "mismatch"])
def test_failed_load_adapter_leaves_model_as_it_was(problem, make_model, output_of, tmp_path) -> None:
    inputs = make_model.inputs("bert_seq_cls")
    saved_adapter(make_model, tmp_path, kind="bert_seq_cls", task_type="SEQ_CLS", target_modules=["key"])
    if problem == "missing_tensor":
        path = tmp_path / "adapter_model.safetensors"
        tensors = safetensors.torch.load_file(path)
        safetensors.torch.save_file({k: v for k, v in tensors.items() if "layer.1" not in k}, path)
    elif problem == "bad_target":
        edit_config(tmp_path, target_modules=["no_such_module"])
    model = dt.get_delta_model(make_model("bert_seq_cls", seed=0 if problem != "mismatch" else 3),
                               dt.LoraConfig(**CFG, task_type="SEQ_CLS"))
    expected = output_of(model, inputs)
    names, configs = structure(model), list(model.peft_config)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(dt.DeltaError):
        model.load_adapter(tmp_path, "second")
    assert structure(model) == names and list(model.peft_config) == configs
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    torch.testing.assert_close(output_of(model, inputs), expected, atol=0, rtol=0)


def test_pissa_adapter_saves_as_plain_lora_for_its_residual_base(make_model, output_of, train, tmp_path) -> None:
    """PiSSA rewrites the base to W - s B A; the saved adapter fits that residual base (the fingerprint
    says so) and is written with init_lora_weights=True so no loader redoes the SVD (peft's advice)."""
    peft = pytest.importorskip("peft")
    inputs = make_model.inputs("llama_lm")
    model = dt.get_delta_model(make_model("llama_lm"), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                     init_lora_weights="pissa"))
    train(model, inputs, steps=2)
    expected = output_of(model.eval(), inputs)
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] is True
    with pytest.raises(dt.BaseModelMismatchError):
        dt.DeltaModel.from_pretrained(make_model("llama_lm"), tmp_path / "adapter")  # the original base
    model.unload().save_pretrained(tmp_path / "residual")

    from transformers import AutoModelForCausalLM

    loaded = dt.DeltaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "residual"),
                                           tmp_path / "adapter")
    torch.testing.assert_close(output_of(loaded, inputs), expected, atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "residual"),
                                                tmp_path / "adapter")
    torch.testing.assert_close(output_of(theirs.eval(), inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_saved_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """Adapter files get ``0o666 & ~umask`` as with a plain ``open()``, not mkstemp's private 0o600."""
    from deltatune.checkpoint.atomic import atomic_write_text

    old = os.umask(umask)
    try:
        model = dt.get_delta_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), dt.LoraConfig(r=2, target_modules=["0"]))
        model.save_pretrained(tmp_path / "adapter")
        atomic_write_text(tmp_path / "note.txt", "x")
    finally:
        os.umask(old)
    files = [tmp_path / "note.txt", *(tmp_path / "adapter").iterdir()]
    assert len(files) == 4  # note.txt, adapter_config.json, adapter_model.safetensors, README.md
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path

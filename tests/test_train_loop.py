"""Training runs on tiny random-init models: outputs, loss weighting, speed options, task coverage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _train_tiny import save_tiny, write_classification, write_pairs, write_text
from safetensors.torch import load_file

from deltatune import all_methods, get_method
from deltatune.commands.inference import run_evaluation
from deltatune.errors import ConfigError
from deltatune.train.loop import train
from deltatune.train.optim import lr_multiplier
from deltatune.train.options import TrainOptions


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "bert": save_tiny("bert", root / "bert"),
        "bert0": save_tiny("bert", root / "bert0", dropout=0.0),
        "llama": save_tiny("llama", root / "llama", dropout=0.0),
        "t5": save_tiny("t5", root / "t5"),
        "cls": write_classification(root / "cls.jsonl", 60),
        "pairs": write_pairs(root / "pairs.jsonl", 60),
        "text": write_text(root / "text.txt", 40),
    }


def _options(out: Path, model: Path, data: Path, **kw: object) -> TrainOptions:
    base = {"model": str(model), "data": str(data), "output_dir": str(out), "quiet": True, "threads": 1,
            "batch_size": 8, "max_steps": 4, "lr": 1e-2}
    return TrainOptions(**{**base, **kw})


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_classification_run_writes_adapter_metrics_summary_and_plots(assets: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train(_options(out, assets["bert"], assets["cls"], max_steps=6, eval_every=3, warmup_steps=2,
                             method_options={"r": 4}))
    tensors = _adapter(out)
    assert any(".classifier." in k for k in tensors)  # the head is trained and saved with the adapter
    assert summary["trainable_params"] == sum(t.numel() for t in tensors.values())
    assert summary["adapter_bytes"] >= (out / "adapter" / "adapter_model.safetensors").stat().st_size
    assert 0 < summary["trainable_share"] < 1 and summary["peak_rss_bytes"] > 10 * 2**20
    assert set(summary["final"]) == {"validation", "test"}
    assert set(summary["final"]["test"]) == {"loss", "accuracy", "macro_f1"}
    assert json.loads((out / "summary.json").read_text()) == summary
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rec = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_rec] == [1, 2, 3, 4, 5, 6]
    f = lr_multiplier("linear", 2, 6)
    assert [r["lr"] for r in train_rec] == pytest.approx([1e-2 * f(t) for t in range(6)])
    evals = [(r["step"], r["split"]) for r in records if r["kind"] == "eval"]
    assert evals == [(3, "validation"), (6, "validation"), (6, "test")]
    for name in ("loss.png", "metric.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((out / "adapter" / "deltatune_run.json").read_text())
    assert info["task"] == "seq_cls" and info["labels"] == ["neg", "neu", "pos"]
    card = (out / "adapter" / "README.md").read_text()  # model card: method, trainable count, data, final metrics
    assert f"{summary['trainable_params']:,} trainable" in card and "lora (LORA)" in card
    assert f"- test: loss {summary['final']['test']['loss']:.4f}" in card and "6 optimizer steps" in card


def test_gradient_accumulation_equals_one_big_batch(assets: dict, tmp_path: Path) -> None:
    """Token-weighted accumulation: 2 x 4 rows give the same update as 8 rows at once."""
    common = {"max_steps": 2, "method_options": {"r": 4}, "max_grad_norm": 0.0}
    train(_options(tmp_path / "big", assets["llama"], assets["pairs"], batch_size=8, grad_accum=1, **common))
    train(_options(tmp_path / "acc", assets["llama"], assets["pairs"], batch_size=4, grad_accum=2, **common))
    big, acc = _adapter(tmp_path / "big"), _adapter(tmp_path / "acc")
    assert any(t.abs().max() > 0 for k, t in big.items() if "lora_B" in k)
    for key in big:
        torch.testing.assert_close(acc[key], big[key], atol=1e-6, rtol=1e-5)


def test_instruction_tuning_lowers_response_loss_below_the_base_model(assets: dict, tmp_path: Path) -> None:
    out = tmp_path / "inst"
    summary = train(_options(out, assets["llama"], assets["pairs"], max_steps=30, lr=2e-2, batch_size=16,
                             method_options={"r": 8, "target_modules": "all-linear"}))
    base = run_evaluation(None, str(assets["llama"]), str(assets["pairs"]), "validation", "instruct", 16, None)
    tuned = summary["final"]["validation"]
    assert tuned["perplexity"] == pytest.approx(math.exp(tuned["loss"]))
    assert tuned["tokens"] == base["tokens"]  # the same response tokens are scored
    assert tuned["loss"] < 0.8 * base["loss"]


@pytest.mark.parametrize("task,model,data", [("seq2seq", "t5", "pairs"), ("causal_lm", "llama", "text")])
def test_other_tasks_train_and_report_perplexity(assets: dict, tmp_path: Path, task: str, model: str, data: str) -> None:
    summary = train(_options(tmp_path / task, assets[model], assets[data], task=task, max_steps=2))
    metrics = summary["final"]["test"]
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert json.loads((tmp_path / task / "adapter" / "adapter_config.json").read_text())["task_type"] == (
        "SEQ_2_SEQ_LM" if task == "seq2seq" else "CAUSAL_LM")


@pytest.mark.parametrize("option", [{"gradient_checkpointing": True}, {"compile": True, "compile_backend": "eager"}])
def test_speed_options_do_not_change_the_result(
    assets: dict, tmp_path: Path, option: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.modeling_utils as mu

    common = {"max_steps": 3, "method_options": {"r": 4}}
    train(_options(tmp_path / "plain", assets["bert0"], assets["cls"], **common))
    used = []
    if "compile" in option:
        real_compile = torch.compile
        monkeypatch.setattr(torch, "compile", lambda *a, **k: used.append(k) or real_compile(*a, **k))
    else:
        real_checkpoint = mu.checkpoint
        monkeypatch.setattr(mu, "checkpoint", lambda *a, **k: used.append(1) or real_checkpoint(*a, **k))
    train(_options(tmp_path / "opt", assets["bert0"], assets["cls"], **common, **option))
    assert used  # the option really took effect
    plain, opt = _adapter(tmp_path / "plain"), _adapter(tmp_path / "opt")
    for key in plain:
        torch.testing.assert_close(opt[key], plain[key], atol=1e-6, rtol=1e-5)


def test_output_dir_is_protected_and_resume_checks_options(assets: dict, tmp_path: Path) -> None:
    out = tmp_path / "guard"
    train(_options(out, assets["bert"], assets["cls"], max_steps=2, save_every=2))
    with pytest.raises(ConfigError, match="already holds a finished run .*step-000002.*--resume"):
        train(_options(out, assets["bert"], assets["cls"], max_steps=2))
    with pytest.raises(ConfigError, match="lr"):
        train(_options(out, assets["bert"], assets["cls"], max_steps=2, save_every=2, resume=True, lr=0.5))
    train(_options(out, assets["bert"], assets["cls"], max_steps=2, overwrite=True))
    assert not (out / "checkpoints").exists()


def test_finished_run_without_checkpoints_is_not_retrained_over(assets: dict, tmp_path: Path) -> None:
    """--resume on a finished run with nothing to resume from refuses (it used to retrain from scratch
    over the finished run); the adapter on disk is left as it was."""
    out = tmp_path / "done"
    train(_options(out, assets["bert"], assets["cls"], max_steps=2))
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    for extra in ({}, {"resume": True}):
        with pytest.raises(ConfigError, match="finished run .*no checkpoint.*--overwrite"):
            train(_options(out, assets["bert"], assets["cls"], max_steps=2, **extra))
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_bad_method_option_fails_before_the_model_loads(assets: dict, tmp_path: Path, monkeypatch) -> None:
    from deltatune.train import loop

    monkeypatch.setattr(loop, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match="lora_dropout"):
        train(_options(tmp_path / "bad", assets["bert"], assets["cls"], max_steps=2,
                       method_options={"lora_dropout": 2.0}))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method", [spec.name for spec in all_methods()])
def test_every_registered_method_trains_saves_and_evaluates(assets: dict, tmp_path: Path, method: str) -> None:
    out = tmp_path / method
    summary = train(_options(out, assets["bert"], assets["cls"], method=method, max_steps=2))
    again = run_evaluation(str(out), None, None, "test", None, 32, None)  # reloads the adapter from disk
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == get_method(method).peft_type
    assert again["loss"] == pytest.approx(summary["final"]["test"]["loss"], abs=1e-6)


def test_missing_train_extra_skips_plots_and_bar_with_a_note(assets: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    """Without matplotlib and tqdm (``pip install deltatune`` without ``[train]``) a run says so at the start,
    trains, and writes everything but the plots (it used to crash after training, at the plot)."""
    from deltatune.train import extras

    monkeypatch.setattr(extras, "installed", lambda module: module not in ("matplotlib", "tqdm"))
    out = tmp_path / "bare"
    summary = train(_options(out, assets["bert"], assets["cls"], max_steps=2, quiet=False))
    err = capsys.readouterr().err
    assert "plots skipped: matplotlib is not installed (pip install 'deltatune[train]'" in err
    assert "no progress bar: tqdm is not installed" in err
    assert err.index("plots skipped") < err.index("done:")  # said before the work, not after
    assert (out / "summary.json").exists() and (out / "adapter" / "adapter_model.safetensors").exists()
    assert not (out / "loss.png").exists() and summary["steps"] == 2

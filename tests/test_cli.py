"""The ``deltatune`` command on tiny random-init models: every subcommand, help texts and argument errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_tiny import save_tiny, write_classification, write_pairs
from safetensors.torch import load_file

from deltatune import DeltaModel
from deltatune.cli import COMMANDS, main
from deltatune.train.data import encoding
from deltatune.train.options import TrainOptions


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    paths = {
        "bert": save_tiny("bert", root / "bert"), "other_bert": save_tiny("bert", root / "other", seed=1),
        "llama": save_tiny("llama", root / "llama", dropout=0.0),
        "cls": write_classification(root / "cls.jsonl", 60), "pairs": write_pairs(root / "pairs.jsonl", 60),
    }
    common = ["--quiet", "--threads", "1", "--batch-size", "8", "--lr", "2e-2"]
    assert main(["train", "--model", str(paths["bert"]), "--data", str(paths["cls"]), "--max-steps", "5",
                 "--output-dir", str(root / "cls_run"), "--method-opt", "r=4", *common]) == 0
    assert main(["train", "--model", str(paths["llama"]), "--data", str(paths["pairs"]), "--max-steps", "5",
                 "--output-dir", str(root / "lm_run"), "--method-opt", "target_modules=all-linear", *common]) == 0
    return {**paths, "cls_run": root / "cls_run", "lm_run": root / "lm_run", "root": root}


def test_every_command_has_complete_help(capsys: pytest.CaptureFixture) -> None:
    for command in COMMANDS:
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert f"usage: deltatune {command}" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(TrainOptions):
        if field.name != "method_options":
            assert "--" + field.name.replace("_", "-") in text, field.name
    assert "--method-opt" in text and "--config" in text and "2402.12354" in text


def test_python_dash_m_deltatune_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "deltatune", "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "demo" in done.stdout


@pytest.mark.parametrize("argv,message", [
    (["train", "--method", "nosuch"], "not a registered method"),
    (["train", "--method-opt", "r8"], "key=value"),
    (["train", "--method-opt", "rank=4", "--data", "DATA"], "Unknown option(s) ['rank']"),
    (["train", "--data", "missing.jsonl"], "neither a built-in data set"),
    (["train", "--model", "bert-base-uncased", "--data", "DATA"], "never downloads"),
    (["train", "--config", "missing.yaml"], "does not exist"),
    (["eval", "--model", "MODEL"], "Which data?"),
    (["predict", "MODEL", "--text", "x"], "holds no adapter"),
])
def test_argument_errors_say_what_is_wrong(
    runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    argv = [a.replace("DATA", str(runs["cls"])).replace("MODEL", str(runs["bert"])) for a in argv]
    code, _, err = _run(capsys, *argv, *(["--output-dir", str(tmp_path / "x")] if argv[0] == "train" else []))
    assert code == 2 and message in err, err


def test_bad_rows_are_reported_with_file_and_line(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good day", "label": "pos"}\n{"text": "", "label": "neg"}\n{"text": "x"}\n')
    code, _, err = _run(capsys, "train", "--model", str(runs["bert"]), "--data", str(bad), "--output-dir",
                        str(tmp_path / "o"), "--task", "seq_cls")
    assert code == 2 and f"{bad}:2" in err and f"{bad}:3" in err
    with pytest.raises(SystemExit) as info:  # argparse itself: wrong type
        main(["train", "--batch-size", "many"])
    assert info.value.code == 2 and "invalid int value" in capsys.readouterr().err


def test_yaml_config_with_command_line_override(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {runs['bert']}\ndata: {runs['cls']}\nmax_steps: 2\nlr: 1e-2\nquiet: true\n"
                      "threads: 1\nmethod_options:\n  r: 2\n  target_modules: [query]\n")
    code, _, _ = _run(capsys, "train", "--config", str(config), "--max-steps", "3", "--output-dir", str(tmp_path / "r"))
    assert code == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 3
    adapter = json.loads((tmp_path / "r" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["target_modules"] == ["query"]


def test_eval_reproduces_the_run_summary_and_evaluates_the_base(runs: dict, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run(capsys, "eval", str(runs["cls_run"]), "--json")
    assert code == 0
    result = json.loads(out)
    final = json.loads((runs["cls_run"] / "summary.json").read_text())["final"]["test"]
    for key in ("loss", "accuracy", "macro_f1"):
        assert result[key] == pytest.approx(final[key], abs=1e-6)
    code, out, _ = _run(capsys, "eval", "--model", str(runs["bert"]), "--data", str(runs["cls"]), "--json")
    base = json.loads(out)
    assert code == 0 and base["adapter"] is None and base["loss"] != pytest.approx(result["loss"])
    code, out, _ = _run(capsys, "eval", str(runs["lm_run"]), "--split", "validation")
    assert code == 0 and "perplexity" in out
    for flag in ("--max-examples", "--max-eval-examples"):  # train's name for the limit works here too
        code, out, _ = _run(capsys, "eval", str(runs["cls_run"]), flag, "2", "--json")
        assert code == 0 and json.loads(out)["examples"] == 2


def _tokens(folder: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return dict(tok(texts, return_tensors="pt", padding=True))


def test_merge_classifier_equals_adapter_and_predict_probabilities(
    runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from transformers import AutoModelForSequenceClassification

    tensors = load_file(str(runs["cls_run"] / "adapter" / "adapter_model.safetensors"))
    assert all(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)  # a merge that can show a difference
    code, out, _ = _run(capsys, "merge", str(runs["cls_run"]), str(tmp_path / "merged"))
    assert code == 0 and "merged model written" in out
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    base = AutoModelForSequenceClassification.from_pretrained(runs["bert"], num_labels=3)
    delta = DeltaModel.from_pretrained(base, runs["cls_run"] / "adapter").eval()
    texts = ["the city is good", "a sad old dog", "what river"]
    inputs = _tokens(tmp_path / "merged", texts)
    with torch.no_grad():
        expected, got = delta(**inputs).logits, merged(**inputs).logits
        plain = AutoModelForSequenceClassification.from_pretrained(runs["bert"], num_labels=3).eval()
        plain.classifier.load_state_dict(merged.classifier.state_dict())
        assert (plain(**inputs).logits - expected).abs().max() > 1e-4  # LoRA changes the encoder
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    code, out, _ = _run(capsys, "predict", str(runs["cls_run"]), *[a for t in texts for a in ("--text", t)], "--json")
    assert code == 0
    for line, row in zip(out.splitlines(), expected):
        item = json.loads(line)
        probs = torch.tensor(list(item["probabilities"].values()))
        torch.testing.assert_close(probs, row.softmax(-1), atol=1e-5, rtol=1e-5)
        assert item["label"] == ["neg", "neu", "pos"][int(row.argmax())]
    listing = tmp_path / "texts.txt"
    listing.write_text("\n".join(texts) + "\n")
    code, table, _ = _run(capsys, "predict", str(runs["cls_run"]), "--file", str(listing))
    assert code == 0
    assert [line.split("\t")[0] for line in table.splitlines()] == [json.loads(x)["label"] for x in out.splitlines()]


def test_merge_and_generate_for_a_causal_lm(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, _, _ = _run(capsys, "merge", str(runs["lm_run"]), str(tmp_path / "merged"))
    assert code == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    prompt = "the city is good"
    code, out, _ = _run(capsys, "generate", str(runs["lm_run"]), "--prompt", prompt, "--max-new-tokens", "6", "--json")
    assert code == 0
    ids = torch.tensor([encoding.instruction_prompt_ids(tok, prompt)])
    with torch.no_grad():
        reference = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                    do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(reference[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert json.loads(out)["response"] == expected and expected


def test_inspect_reports_contents_and_checks_the_base(runs: dict, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run(capsys, "inspect", str(runs["cls_run"]), "--json", "--base", str(runs["bert"]))
    report = json.loads(out)
    tensors = load_file(str(runs["cls_run"] / "adapter" / "adapter_model.safetensors"))
    assert code == 0 and report["peft_type"] == "LORA" and report["task"] == "seq_cls"
    assert report["trainable_params"] == sum(t.numel() for t in tensors.values())
    assert report["weights_bytes"] == (runs["cls_run"] / "adapter" / "adapter_model.safetensors").stat().st_size
    assert sorted(p.rsplit(".", 1)[-1] for p in report["wrapped_modules"]) == ["query", "query", "value", "value"]
    assert report["fingerprint"]["model_type"] == "bert" and report["base_matches"] is True
    code, out, _ = _run(capsys, "inspect", str(runs["cls_run"]), "--base", str(runs["other_bert"]))
    assert code == 1 and "DOES NOT MATCH" in out and "different weights" in out
    code, out, _ = _run(capsys, "inspect", str(runs["cls_run"] / "adapter"))
    assert "trainable params" in out and "fingerprint:      BertForSequenceClassification" in out


def test_a_file_without_its_label_column_names_the_flag(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": t, "stars": s}) + "\n" for t, s in [("good", 5), ("bad", 1)] * 10))
    code, _, err = _run(capsys, "train", "--model", str(runs["bert"]), "--data", str(data), "--quiet",
                        "--output-dir", str(tmp_path / "out"))
    assert code != 0 and "no 'label' column" in err and "--label-column stars" in err and "--task causal_lm" in err
    assert not (tmp_path / "out").exists()


def test_serve_takes_vllm_s_lora_modules_as_adapters() -> None:
    from deltatune.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "smollm2", "--adapter", "a=runs/a",
                                      "--lora-modules", "b=runs/b", "c=runs/c"])
    assert args.adapter == ["a=runs/a", "b=runs/b", "c=runs/c"]
    assert build_parser().parse_args(["serve", "--model", "m", "--lora-modules", "b=x"]).adapter == ["b=x"]
    vllm_line = ["serve", "--model", "m", "--enable-lora", "--lora-modules", "b=x", "--served-model-name", "base"]
    args = build_parser().parse_args(vllm_line)
    assert (args.adapter, args.served_model_name) == (["b=x"], "base")

"""Round two's proof benchmarks: the forgetting frontier's training curve and the low-data pick."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import lowdata_all
from bench.loop import epoch_batches, perplexity, train


def _tiny_lm() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def _features(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, 50, (4 + i % 5,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return out


def test_training_with_a_perplexity_curve_trains_exactly_like_the_plain_loop() -> None:
    from bench.forgetting import _train_with_curve

    feats, evals = _features(20, 0), {"held": _features(6, 1)}
    batches = epoch_batches(feats, seed=0, epochs=1, batch_size=4, pad_id=0)  # 5 batches
    plain = _tiny_lm()
    ref = train(plain, batches, lr=1e-2)
    curved = _tiny_lm()
    before = {"held": perplexity(curved, evals["held"], pad_id=0)}
    stats, curve = _train_with_curve(curved, batches, 1e-2, {"eval_every": 2}, evals, 0, before)
    assert [p["step"] for p in curve] == [0, 2, 4, 5]  # every 2 steps and the last one
    assert stats.losses == pytest.approx(ref.losses, rel=1e-5)  # evaluating in between changes nothing
    assert curve[-1]["ppl"]["held"] == pytest.approx(perplexity(plain, evals["held"], pad_id=0), rel=1e-5)
    assert curve[0]["ppl"] == before and curve[-1]["ppl"]["held"] != before["held"]


@pytest.mark.skipif(shutil.which("bible") is None, reason="needs the bible command (Debian package bible-kjv)")
def test_kjv_training_text_shares_no_passage_or_book_with_the_held_out_kjv() -> None:
    from bench.corpus import KJV_CHAPTERS, KJV_TRAIN_BOOKS, kjv, kjv_train

    train_texts, held = kjv_train(10_000), kjv(10_000)
    assert train_texts and held and len(train_texts) > 600  # enough for 100 steps of batch 4 without repeats
    assert not set(train_texts) & set(held)
    held_books = {ref.rstrip("0123456789:-") for ref in KJV_CHAPTERS}
    assert not held_books & {book for book, _ in KJV_TRAIN_BOOKS}


def _write_cache(path: Path, rows: list[tuple[str, int, str, float, int, float, float]]) -> None:
    lines = []
    for task, n, method, lr, seed, val, test in rows:
        job = lowdata_all.job(task, n, method, lr, seed)
        result = {"ok": True, "runs": [{"seed": seed, "accuracy": val, "accuracies": {"validation": val, "test": test}}]}
        lines.append(json.dumps({"key": json.dumps(job, sort_keys=True), "result": result}))
    path.write_text("\n".join(lines) + "\n")


def test_lowdata_picks_the_rate_on_validation_and_reports_test_at_that_rate_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lowdata_all, "CACHE", tmp_path / ".lowdata.jobs.jsonl")
    lo, hi = lowdata_all.GRID["ia3"]
    rows = [("trec", 50, "ia3", lo, 0, 0.70, 0.90),  # best test, worse validation: must not be picked
            ("trec", 50, "ia3", hi, 0, 0.80, 0.40),
            ("trec", 50, "ia3", hi, 1, 0.75, 0.60),
            ("trec", 50, "ia3", lo, 1, 0.99, 0.99),  # seed 1 never takes part in the pick
            ("rt", 50, "ia3", lo, 0, 0.60, 0.60),  # grid incomplete: the one rate, marked as not searched
            ("bbc", 50, "ia3", lo, 0, 0.50, 0.50), ("bbc", 50, "ia3", hi, 0, 0.50, 0.70)]  # tie: lower rate
    _write_cache(lowdata_all.CACHE, rows)
    test = lowdata_all.picked_test(lowdata_all.results())
    assert test[("trec", 50, "ia3")]["lr"] == hi and test[("trec", 50, "ia3")]["seeds"] == [0, 1]
    assert test[("trec", 50, "ia3")]["mean"] == pytest.approx(50.0)
    assert test[("trec", 50, "ia3")]["std"] == pytest.approx(14.142, abs=1e-3)
    assert test[("rt", 50, "ia3")]["lr"] == lo and not test[("rt", 50, "ia3")]["searched"]
    assert test[("trec", 50, "ia3")]["searched"]
    assert lowdata_all.pick(lowdata_all.results()[("rt", 50, "ia3")], lowdata_all.GRID["ia3"]) is None
    assert test[("bbc", 50, "ia3")]["lr"] == lo and test[("bbc", 50, "ia3")]["mean"] == pytest.approx(50.0)

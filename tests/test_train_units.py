"""Unit tests of the training pieces: options, schedule, LoRA+ groups, metrics, checkpoints, data order."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.train import resume as checkpoints
from deltatune.train.loop import Schedule
from deltatune.train.metrics import MetricsLog, accuracy, macro_f1, majority_baseline, perplexity
from deltatune.train.optim import lr_multiplier, make_optimizer, make_scheduler, param_groups
from deltatune.train.options import TrainOptions, build_options, parse_method_opt, read_yaml


# -- options ---------------------------------------------------------------------------------------
def test_yaml_then_cli_precedence_and_method_options_merge(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-4\nbatch-size: 4\nepochs: 3\nmethod_options:\n  r: 4\n  lora_alpha: 8\n")
    file_values = read_yaml(path)
    assert file_values["lr"] == "1e-4"  # YAML 1.1 reads this as a string; build_options must convert it
    options = build_options(file_values, {"batch_size": 8, "method_options": {"r": 16}})
    assert options.lr == pytest.approx(1e-4) and isinstance(options.lr, float)
    assert options.batch_size == 8 and options.epochs == 3
    assert options.method_options == {"r": 16, "lora_alpha": 8}
    config = options.method_config("seq_cls")
    assert isinstance(config, dt.LoraConfig) and config.r == 16 and config.task_type == "SEQ_CLS"


def test_yaml_unknown_key_and_bad_values_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        read_yaml(path)
    with pytest.raises(ConfigError, match="schedule"):
        TrainOptions(schedule="exponential")
    with pytest.raises(ConfigError, match="batch_size"):
        TrainOptions(batch_size=0)
    with pytest.raises(ConfigError, match="lr must be a positive"):
        TrainOptions(lr=-1.0)
    with pytest.raises(ConfigError, match="lr must be a number"):
        build_options({"lr": "fast"}, {})
    with pytest.raises(ConfigError, match="not a registered method"):
        TrainOptions(method="nosuch")
    with pytest.raises(ConfigError, match="Unknown option.*rank"):
        TrainOptions(method_options={"rank": 4}).method_config("seq_cls")


def test_parse_method_opt_reads_yaml_values() -> None:
    assert parse_method_opt("r=8") == ("r", 8)
    assert parse_method_opt("target_modules=[query,value]") == ("target_modules", ["query", "value"])
    assert parse_method_opt("use-dora=true") == ("use_dora", True)
    with pytest.raises(ConfigError, match="key=value"):
        parse_method_opt("r8")


# -- schedule and optimizer ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_lr_schedule_matches_formula(kind: str) -> None:
    warmup, total = 4, 20
    f = lr_multiplier(kind, warmup, total)
    for t in range(total + 1):
        if t < warmup:
            expected = t / warmup
        elif kind == "linear":
            expected = (total - t) / (total - warmup)
        elif kind == "cosine":
            expected = 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
        else:
            expected = 1.0
        assert f(t) == pytest.approx(expected, abs=1e-12), t


def _lora_mlp() -> dt.DeltaModel:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules=["0", "2"], bias="lora_only"))


def test_loraplus_gives_b_matrices_ratio_times_lr_and_no_decay_on_vectors() -> None:
    model = _lora_mlp()
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, loraplus_ratio=16)
    by_name = {n: g for g in groups for n in g["names"]}
    assert set(by_name) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, group in by_name.items():
        is_b = ".lora_B." in name
        assert group["lr"] == pytest.approx(1.6e-2 if is_b else 1e-3), name
        assert group["weight_decay"] == (0.0 if name.endswith("bias") else 0.1), name
    scheduler = make_scheduler(make_optimizer(model, 1e-3, 0.1, 16), "constant", 0, 10)
    assert sorted(scheduler.get_last_lr()) == pytest.approx([1e-3, 1e-3, 1.6e-2])


def test_loraplus_needs_b_matrices() -> None:
    model = _lora_mlp()
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name)
    with pytest.raises(ConfigError, match="B matrices"):
        param_groups(model, 1e-3, 0.0, 4.0)


def test_schedule_visits_every_row_once_per_epoch_with_accumulation() -> None:
    options = TrainOptions(batch_size=3, grad_accum=2, epochs=2, seed=5)
    schedule = Schedule(10, options)  # 4 micro-batches -> 2 optimizer steps per epoch
    assert (schedule.micro_per_epoch, schedule.steps_per_epoch, schedule.total) == (4, 2, 4)
    for epoch in range(2):
        rows = [i for step in range(epoch * 2, epoch * 2 + 2) for mb in schedule.group(step) for i in mb]
        assert sorted(rows) == list(range(10))
    assert schedule.group(0) != schedule.group(2)  # a new order each epoch
    assert Schedule(10, options).group(3) == schedule.group(3)  # a pure function of the step


def test_group_by_length_keeps_every_row_and_cuts_padding() -> None:
    lengths = [(i * 37) % 50 + 1 for i in range(400)]
    plain = Schedule(400, TrainOptions(batch_size=8, seed=1), lengths=lengths)  # option off: lengths ignored
    grouped = Schedule(400, TrainOptions(batch_size=8, seed=1, group_by_length=True), lengths=lengths)
    assert plain.group(0) == Schedule(400, TrainOptions(batch_size=8, seed=1)).group(0)

    def padded(schedule: Schedule) -> int:
        return sum(max(lengths[i] for i in mb) * len(mb) for s in range(50) for mb in schedule.group(s))

    rows = [i for step in range(grouped.steps_per_epoch) for mb in grouped.group(step) for i in mb]
    assert sorted(rows) == list(range(400))
    assert padded(grouped) < 0.7 * padded(plain)  # sum(lengths) = 10,200; random batches pad far more
    first = [lengths[i] for i in grouped.group(0)[0]]
    assert max(first) - min(first) <= 2  # neighbours in a sorted chunk of 50 batches
    again = Schedule(400, TrainOptions(batch_size=8, seed=1, group_by_length=True), lengths=lengths)
    assert [again.group(s) for s in range(5)] == [grouped.group(s) for s in range(5)]


# -- metrics ---------------------------------------------------------------------------------------
def test_metrics_against_hand_computed_values() -> None:
    gold = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 0, 2]
    assert accuracy(pred, gold) == pytest.approx(4 / 6)
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 2 fp 1 fn 0 -> 0.8; class 2: tp 1 fp 0 fn 1 -> 2/3
    assert macro_f1(pred, gold, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert macro_f1([0, 0], [0, 0], 2) == pytest.approx(0.5)  # an absent class counts 0
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert majority_baseline(["a", "b", "b"], ["b", "a", "b", "b"]) == ("b", 0.75)


def test_metrics_log_truncates_after_resume_point(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "m.jsonl")
    for step in (1, 2, 3):
        log.write({"kind": "train", "step": step})
    with log.path.open("a") as handle:
        handle.write('{"kind": "train", "st')  # cut short by a kill
    log.truncate(2)
    assert [r["step"] for r in log.read()] == [1, 2]
    log.write({"kind": "eval", "step": 2, "final": True})  # end-of-run evaluation, redone after a resume
    log.truncate(2)
    assert [r["step"] for r in log.read()] == [1, 2]


# -- checkpoints -----------------------------------------------------------------------------------
def test_checkpoint_round_trip_restores_tensors_optimizer_and_rng(tmp_path: Path) -> None:
    model = _lora_mlp()
    opt = make_optimizer(model, 1e-2, 0.0, None)
    sched = make_scheduler(opt, "linear", 1, 10)
    x = torch.randn(4, 6)
    for _ in range(3):
        model(x).pow(2).sum().backward()
        opt.step(), sched.step(), opt.zero_grad()
    torch.manual_seed(123)
    path = checkpoints.save_checkpoint(tmp_path, 3, model, opt, sched, {"position": {"epoch": 0}}, keep=2)
    expected_rand = torch.rand(3)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    saved_opt = {k: v.clone() for s in opt.state.values() for k, v in s.items()}

    other = _lora_mlp()  # fresh weights, fresh optimizer
    opt2 = make_optimizer(other, 1e-2, 0.0, None)
    sched2 = make_scheduler(opt2, "linear", 1, 10)
    torch.manual_seed(999)
    state = checkpoints.load_checkpoint(path, other, opt2, sched2)
    assert state["step"] == 3 and state["position"] == {"epoch": 0}
    for name, p in other.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, saved[name]), name
    assert {k: v for s in opt2.state.values() for k, v in s.items()}.keys() == saved_opt.keys()
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(torch.rand(3), expected_rand)  # the generator continues where it was saved


def test_checkpoints_are_pruned_and_partial_folders_ignored(tmp_path: Path) -> None:
    model = _lora_mlp()
    opt = make_optimizer(model, 1e-2, 0.0, None)
    sched = make_scheduler(opt, "constant", 0, 10)
    for step in (2, 4, 6):
        checkpoints.save_checkpoint(tmp_path, step, model, opt, sched, {}, keep=2)
    partial = tmp_path / "checkpoints" / ".tmp-step-000008-1"
    partial.mkdir()
    (partial / "state.json").write_text("{")  # a kill in the middle of writing
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["step-000004", "step-000006"]
    checkpoints.clean_partial(tmp_path)
    assert not partial.exists()


def test_demo_uses_only_free_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from deltatune.commands import demo

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for load, expected in ((0.1, 2), (0.9, 1), (5.5, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert demo.free_cores() == expected
        assert demo.demo_options().threads == expected
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 0, 0))
    assert demo.free_cores() == 5

"""The training loop behind ``deltatune train``.

One optimizer step consumes ``grad_accum`` micro-batches of ``batch_size`` rows. The data order of
epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)``, so the rows of any step
are a pure function of the step number: resuming needs only the step, the trainable tensors, the
optimizer, the scheduler and the random generators (for dropout), and then continues bit for bit.
Losses are token- (or example-) weighted over the whole accumulation group:
``L = sum_i loss_sum_i / sum_i count_i``, so accumulation equals one big batch.

Environment: ``DELTATUNE_STEP_DELAY`` (seconds, default 0) sleeps after every optimizer step; the
interruption test uses it to kill a run reliably half-way.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..bundled import resolve_model_path
from ..errors import ConfigError
from ..model import DeltaModel, get_delta_model
from . import checkpoints
from .evaluate import evaluate
from .metrics import MetricsLog
from .optim import make_optimizer, make_scheduler
from .options import TrainOptions
from .progress import Progress
from .runs import ADAPTER_DIR, RunInfo, count_parameters, folder_bytes, peak_rss_bytes, prepare_output
from .sources import DataSpec, Splits, infer_task, limit, load_splits
from .tasks import (
    Encoder,
    Features,
    collate,
    count_terms,
    forward,
    load_base_model,
    load_tokenizer,
    loss_sum,
    uses_chat,
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Run:
    """Everything a training run holds."""

    options: TrainOptions
    task: str
    model_path: str
    encoder: Encoder
    splits: Splits
    model: DeltaModel
    features: dict[str, list[Features]] = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        return int(self.encoder.tokenizer.pad_token_id)


def build_run(options: TrainOptions) -> Run:
    """Load data, tokenizer and model, and add the adapter (seeded, so the task head starts the same)."""
    spec = DataSpec.from_options(options)
    task = options.task or infer_task(spec)
    splits = load_splits(spec, task)
    if not splits.train:
        raise ConfigError(f"No training rows in {options.data!r}.")
    model_path = resolve_model_path(options.model)
    tokenizer = load_tokenizer(model_path)
    chat = task == "instruct" and uses_chat(tokenizer, options.prompt_format)
    encoder = Encoder(task, tokenizer, options.max_length, splits.labels, chat)
    seed_everything(options.seed)
    base = load_base_model(task, model_path, splits.labels)
    model = get_delta_model(base, options.method_config(task))
    rows = {
        "train": limit(splits.train, options.max_train_examples),
        "validation": limit(splits.validation, options.max_eval_examples),
        "test": limit(splits.test, options.max_eval_examples),
    }
    features = {split: encoder.encode_rows(part) if part else [] for split, part in rows.items()}
    return Run(options, task, model_path, encoder, splits, model, features)


def _setup_speed_options(run: Run) -> nn.Module:
    """Gradient checkpointing and ``torch.compile``; returns the module to call for training steps."""
    options, base = run.options, run.model.base_model
    if options.gradient_checkpointing:
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise ConfigError(f"{type(base).__name__} does not support gradient checkpointing; drop the option.")
        kwargs = {"use_reentrant": False}  # frozen inputs need the non-reentrant variant
        enable = getattr(base, "activation_checkpointing_enable", None)  # transformers >= 5 name
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if options.compile:
        return torch.compile(run.model, backend=options.compile_backend, dynamic=True)
    return run.model


class Schedule:
    """Which rows each optimizer step uses (see the module docstring)."""

    def __init__(self, n_rows: int, options: TrainOptions) -> None:
        self.n, self.bs, self.accum, self.seed = n_rows, options.batch_size, options.grad_accum, options.seed
        self.micro_per_epoch = math.ceil(n_rows / self.bs)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / self.accum)
        self.total = options.max_steps or options.epochs * self.steps_per_epoch
        self._perm: tuple[int, list[int]] | None = None

    def _permutation(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=gen).tolist())
        return self._perm[1]

    def position(self, step: int) -> dict[str, int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "micro_batch": k * self.accum}

    def group(self, step: int) -> list[list[int]]:
        """Row indices of each micro-batch of optimizer step ``step`` (0-based)."""
        pos = self.position(step)
        perm = self._permutation(pos["epoch"])
        last = min(pos["micro_batch"] + self.accum, self.micro_per_epoch)
        return [perm[m * self.bs : (m + 1) * self.bs] for m in range(pos["micro_batch"], last)]


def train_step(run: Run, module: nn.Module, groups: list[list[int]], optimizer: Any, scheduler: Any) -> dict:
    """One optimizer step over the micro-batches ``groups``; returns the step's loss and sizes."""
    feats, task = run.features["train"], run.task
    batches = [collate([feats[i] for i in idx], run.pad_id) for idx in groups]
    denom = max(1, sum(count_terms(task, b) for b in batches))
    total = 0.0
    for batch in batches:
        loss, _ = loss_sum(task, forward(module, task, batch), batch)
        (loss / denom).backward()
        total += float(loss.detach())
    if run.options.max_grad_norm > 0:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, run.options.max_grad_norm)
    lr = optimizer.param_groups[0]["lr"] / _lr_factor(optimizer.param_groups[0], run.options)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return {"loss": total / denom, "lr": lr, "examples": sum(len(g) for g in groups), "tokens": tokens}


def _lr_factor(group: dict, options: TrainOptions) -> float:
    """1, or the LoRA+ ratio when the first group is the B-matrix group (report the base lr)."""
    base = group.get("initial_lr", options.lr)
    return base / options.lr if base else 1.0


def run_eval(run: Run, split: str) -> dict[str, float]:
    labels = run.splits.labels
    return evaluate(run.model, run.task, run.features[split], max(run.options.batch_size, 32), run.pad_id,
                    len(labels) if labels else None)


def _resume(run: Run, out: Path, optimizer: Any, scheduler: Any, log: MetricsLog, say: Any) -> tuple[int, float]:
    """(start step, elapsed seconds before this process) from the newest checkpoint, if any."""
    checkpoints.clean_partial(out)
    found = checkpoints.list_checkpoints(out)
    if not run.options.resume or not found:
        if run.options.resume:
            say(f"No checkpoint in {out / checkpoints.FOLDER}; starting from the beginning.")
        log.path.write_text("", encoding="utf-8")
        return 0, 0.0
    state = checkpoints.load_checkpoint(found[-1], run.model, optimizer, scheduler)
    saved = TrainOptions(**state["options"])
    diff = run.options.differences(saved)
    if diff:
        raise ConfigError(f"--resume with options that differ from the checkpointed run: {diff}. Use the same options.")
    log.truncate(state["step"])
    say(f"Resumed from {found[-1]} (step {state['step']}).")
    return int(state["step"]), float(state.get("elapsed_s", 0.0))


def train(options: TrainOptions) -> dict[str, Any]:
    """Run ``deltatune train``; returns the summary that is also written to ``summary.json``."""
    out = Path(options.output_dir)
    prepare_output(out, options.resume, options.overwrite)
    started = time.perf_counter()
    if options.threads:
        torch.set_num_threads(options.threads)
    run = build_run(options)
    module = _setup_speed_options(run)
    schedule = Schedule(len(run.features["train"]), options)
    warmup = options.warmup_steps if options.warmup_steps is not None else round(options.warmup_ratio * schedule.total)
    optimizer = make_optimizer(run.model, options.lr, options.weight_decay, options.loraplus_lr_ratio)
    scheduler = make_scheduler(optimizer, options.schedule, warmup, schedule.total)
    log = MetricsLog(out / "metrics.jsonl")
    progress = Progress(schedule.total, options.quiet)
    start, elapsed_before = _resume(run, out, optimizer, scheduler, log, progress.say)
    (out / "train_options.json").write_text(json.dumps(options.to_dict(), indent=2) + "\n", encoding="utf-8")
    progress.start(start)
    delay = float(os.environ.get("DELTATUNE_STEP_DELAY") or 0)
    run.model.train()
    for step in range(start, schedule.total):
        t0 = time.perf_counter()
        record = train_step(run, module, schedule.group(step), optimizer, scheduler)
        record = {"kind": "train", "step": step + 1, "epoch": (step + 1) / schedule.steps_per_epoch, **record,
                  "seconds": time.perf_counter() - t0}
        log.write(record)
        progress.update(record)
        done = step + 1
        if options.eval_every and done % options.eval_every == 0 and done < schedule.total:
            metrics = run_eval(run, "validation")
            log.write({"kind": "eval", "split": "validation", "step": done, **metrics})
            progress.say_metrics(done, metrics)
        if options.save_every and done % options.save_every == 0:
            extra = {"position": schedule.position(done), "options": options.to_dict(),
                     "elapsed_s": elapsed_before + time.perf_counter() - started}
            checkpoints.save_checkpoint(out, done, run.model, optimizer, scheduler, extra, options.keep_checkpoints)
        if delay:
            time.sleep(delay)
    progress.close()
    return finish(run, out, schedule.total, elapsed_before + time.perf_counter() - started, log, progress)


def finish(run: Run, out: Path, steps: int, elapsed: float, log: MetricsLog, progress: Progress) -> dict[str, Any]:
    """Final evaluation, adapter, summary.json and plots."""
    from .plots import write_plots

    final = {split: run_eval(run, split) for split in ("validation", "test") if run.features[split]}
    for split, metrics in final.items():
        log.write({"kind": "eval", "split": split, "step": steps, **metrics})
    adapter = out / ADAPTER_DIR
    run.model.save_pretrained(adapter)
    options = run.options
    RunInfo(run.task, options.model, run.splits.labels, options.prompt_format, options.max_length,
            {k: getattr(options, k) for k in DataSpec.__dataclass_fields__}).save(adapter)
    trainable, total = count_parameters(run.model)
    summary = {
        "task": run.task, "model": options.model, "method": options.method, "data": options.data,
        "steps": steps, "train_examples": len(run.features["train"]), "final": final,
        "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
        "adapter_bytes": folder_bytes(adapter), "wall_time_s": elapsed, "peak_rss_bytes": peak_rss_bytes(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_plots(log.read(), out)
    progress.say_summary(summary)
    return summary

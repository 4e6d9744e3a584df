"""The training loop behind ``deltatune train``.

One optimizer step consumes ``grad_accum`` micro-batches of ``batch_size`` rows. The data order of
epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)``, so the rows of any step
are a pure function of the step number: resuming needs only the step, the trainable tensors, the
optimizer, the scheduler and the random generators (for dropout), and then continues bit for bit.
Losses are token- (or example-) weighted over the whole accumulation group:
``L = sum_i loss_sum_i / sum_i count_i``, so accumulation equals one big batch.

Several processes (``torchrun``): see :mod:`.distributed.runtime`. The loop asks a :class:`Distributed` object
for this rank's rows, the module to call, metric sums and whether it is rank 0 (which alone writes);
in a single process that object does nothing.

Environment: ``DELTATUNE_STEP_DELAY`` (seconds, default 0) sleeps after every optimizer step; the
interruption test uses it to kill a run reliably half-way.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..bundled import resolve_model_path
from ..errors import ConfigError
from ..integrations.model_card import add_training_results
from ..model import DeltaModel, get_delta_model
from ..quant.convert import flag_checkpointing
from ..step_hooks import step_hooks
from . import resume as checkpoints
from .cpu import torch_threads
from .data.sources import DataSpec, Splits, infer_task, limit, load_splits
from .distributed import resume as dist_checkpoints
from .distributed.runtime import Distributed
from .evaluate import evaluate
from .extras import skipped_features
from .loftq_base import finish_loftq_model, load_loftq_base, save_loftq_base, wants_loftq
from .metrics import MetricsLog
from .optim import make_optimizer, make_scheduler
from .options import TrainOptions
from .progress import Progress
from .runs import ADAPTER_DIR, RunInfo, count_parameters, folder_bytes, peak_rss_bytes, prepare_output
from .tasks import (
    Encoder,
    Features,
    collate,
    count_terms,
    forward,
    load_base_model,
    load_tokenizer,
    loss_sum,
    pick_device,
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


def build_run(options: TrainOptions, dist: Distributed | None = None) -> Run:
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
    device = pick_device(options.device) if dist is None else dist.model_device(pick_device(options.device))
    config = options.method_config(task)
    if wants_loftq(options.method_options):  # LoftQ quantizes the float base itself (see .loftq_base)
        float_base = load_base_model(task, model_path, splits.labels).to(device)  # bitsandbytes quantizes on it
        base = load_loftq_base(float_base, config, options.method, options.quantize_embeddings)
    else:
        base = load_base_model(task, model_path, splits.labels, options.quantize, device, for_training=True,
                               quantize_embeddings=options.quantize_embeddings)
    model = get_delta_model(base, config).to(device)
    if wants_loftq(options.method_options):
        finish_loftq_model(model)
    rows = {
        "train": limit(splits.train, options.max_train_examples),
        "validation": limit(splits.validation, options.max_eval_examples),
        "test": limit(splits.test, options.max_eval_examples),
    }
    features = {split: encoder.encode_rows(part) if part else [] for split, part in rows.items()}
    return Run(options, task, model_path, encoder, splits, model, features)


def _setup_speed_options(run: Run, dist: Distributed) -> nn.Module:
    """Gradient checkpointing, the DDP/FSDP wrapper and ``torch.compile``; returns the module to call for
    training steps."""
    options, base = run.options, run.model.get_base_model()
    if options.gradient_checkpointing:
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise ConfigError(f"{type(base).__name__} does not support gradient checkpointing; drop the option.")
        kwargs = {"use_reentrant": False}  # frozen inputs need the non-reentrant variant
        enable = getattr(base, "activation_checkpointing_enable", None)  # transformers >= 5 name
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        flag_checkpointing(base)  # a quantized base's 4-bit layers: one dequantization fewer (quant.bnb_training)
    module = dist.wrap(run.model)
    if options.compile:
        return torch.compile(module, backend=options.compile_backend, dynamic=True)
    return module


GROUP_CHUNK = 50  # micro-batches sorted together by --group-by-length


class Schedule:
    """Which rows each optimizer step uses (see the module docstring); with ``ranks`` processes a micro-batch
    holds ``batch_size * ranks`` rows, which :meth:`Distributed.shard` splits among the ranks."""

    def __init__(self, n_rows: int, options: TrainOptions, ranks: int = 1, lengths: list[int] | None = None) -> None:
        self.n, self.bs, self.accum, self.seed = n_rows, options.batch_size * ranks, options.grad_accum, options.seed
        self.micro_per_epoch = math.ceil(n_rows / self.bs)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / self.accum)
        self.total = options.max_steps or options.epochs * self.steps_per_epoch
        self.lengths = lengths if options.group_by_length else None
        self._epoch: tuple[int, list[list[int]]] | None = None

    def _batches(self, epoch: int) -> list[list[int]]:
        """The micro-batches of ``epoch``: consecutive slices of a seeded permutation; with ``group_by_length``
        each chunk of ``GROUP_CHUNK`` micro-batches is sorted by length before slicing (little padding), and
        the micro-batches are then shuffled with the same generator."""
        if self._epoch is None or self._epoch[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=gen).tolist()
            if self.lengths is not None:
                lengths, chunk = self.lengths, self.bs * GROUP_CHUNK
                perm = [i for c in range(0, self.n, chunk) for i in sorted(perm[c : c + chunk], key=lambda i: -lengths[i])]
            batches = [perm[m * self.bs : (m + 1) * self.bs] for m in range(self.micro_per_epoch)]
            if self.lengths is not None:
                batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
            self._epoch = (epoch, batches)
        return self._epoch[1]

    def position(self, step: int) -> dict[str, int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "micro_batch": k * self.accum}

    def group(self, step: int) -> list[list[int]]:
        """Row indices of each micro-batch of optimizer step ``step`` (0-based)."""
        pos = self.position(step)
        return self._batches(pos["epoch"])[pos["micro_batch"] : pos["micro_batch"] + self.accum]


def train_step(
    run: Run, module: nn.Module, groups: list[list[int]], optimizer: Any, scheduler: Any, dist: Distributed | None = None,
) -> dict:
    """One optimizer step over the micro-batches ``groups`` (global: every rank's rows); returns the step's
    loss and sizes, summed over ranks.

    Rank ``r`` reads its share of each micro-batch and back-propagates ``W * loss_r / N`` with ``N`` the
    loss terms of all ranks, so DDP's gradient average equals one process over all rows. A rank whose
    share of the epoch's last micro-batch is empty runs a zero-weighted pass on a borrowed row, so every
    rank joins the same collectives.
    """
    dist = dist or Distributed()
    feats, task = run.features["train"], run.task
    shares = [dist.shard(idx) for idx in groups]
    weights = [1.0 if share else 0.0 for share in shares]
    batches = [dist.to_device(collate([feats[i] for i in (share or idx[:1])], run.pad_id))
               for share, idx in zip(shares, groups)]
    (terms,) = dist.sum(sum(count_terms(task, b) * w for b, w in zip(batches, weights)))
    denom = max(1.0, terms)
    total = 0.0
    for k, (batch, weight) in enumerate(zip(batches, weights)):
        with dist.grad_sync(module, sync=k == len(batches) - 1):
            with dist.autocast():
                loss, _ = loss_sum(task, forward(module, task, batch), batch)
            (loss * (weight * dist.loss_scale() / denom)).backward()
        total += float(loss.detach()) * weight
    hooks = step_hooks(run.model)  # methods acting around the optimizer step (AdaLoRA's rank budget)
    for hook in hooks:
        hook.before_optimizer_step()
    if run.options.max_grad_norm > 0:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, run.options.max_grad_norm)
    lr = run.options.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)  # the base lr of this step (before LoRA+)
    optimizer.step()
    for hook in hooks:
        hook.after_optimizer_step(scheduler.last_epoch + 1)  # optimizer steps done, this one included
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(b["attention_mask"].sum()) * w for b, w in zip(batches, weights))
    total, tokens = dist.sum(total, tokens)
    return {"loss": total / denom, "lr": lr, "examples": sum(len(g) for g in groups), "tokens": int(tokens)}


def run_eval(run: Run, split: str, progress: Progress | None = None) -> dict[str, float]:
    """Metrics on ``split``; with ``progress``, a bar over its batches (final evaluations can take minutes)."""
    labels = run.splits.labels
    bar = progress.batches(f"eval {split}") if progress is not None else None
    return evaluate(run.model, run.task, run.features[split], max(run.options.batch_size, 32), run.pad_id,
                    len(labels) if labels else None, on_batch=bar)


def _resume(
    run: Run, out: Path, optimizer: Any, scheduler: Any, log: MetricsLog, say: Any, dist: Distributed,
) -> tuple[int, float]:
    """(start step, elapsed seconds before this process) from the newest checkpoint, if any."""
    if dist.is_main:
        checkpoints.clean_partial(out)
    found = dist_checkpoints.newest_checkpoint(dist, out) if run.options.resume else None
    if found is None:
        if run.options.resume:
            say(f"No checkpoint in {out / checkpoints.FOLDER}; starting from the beginning.")
        log.path.write_text("", encoding="utf-8")
        return 0, 0.0
    state = dist_checkpoints.load_checkpoint(dist, found, run.model, optimizer, scheduler)
    saved = TrainOptions(**state["options"])
    diff = run.options.differences(saved)
    if diff:
        raise ConfigError(f"--resume with options that differ from the checkpointed run: {diff}. Use the same options.")
    log.truncate(state["step"])
    say(f"Resumed from {found} (step {state['step']}).")
    return int(state["step"]), float(state.get("elapsed_s", 0.0))


def train(options: TrainOptions) -> dict[str, Any]:
    """Run ``deltatune train``; returns the summary that is also written to ``summary.json``.

    Under ``torchrun`` every rank runs this; rank 0 alone writes files and progress. The method's options
    are checked first, so a bad one fails in a second, before data, tokenizer and model load.
    """
    options.method_config(options.task or infer_task(DataSpec.from_options(options)))
    with torch_threads(options.threads):
        dist = Distributed.from_env(options.fsdp, options.bf16, options.dist_timeout, device=options.device)
        with dist.guard("training"):
            summary = _train(options, dist)
        dist.close()
    return summary


def _train(options: TrainOptions, dist: Distributed) -> dict[str, Any]:
    out = Path(options.output_dir)
    dist.on_main(lambda: prepare_output(out, options.resume, options.overwrite), "preparing the output folder")
    skipped = skipped_features(options.quiet) if dist.is_main else {}
    for note in skipped.values():
        print(note, file=sys.stderr)
    dist.on_main(lambda: resolve_model_path(options.model), "preparing the model")  # a bundled export runs once
    started = time.perf_counter()
    run = build_run(options, dist)
    module = _setup_speed_options(run, dist)
    lengths = [len(f["input_ids"]) for f in run.features["train"]]
    schedule = Schedule(len(lengths), options, dist.world_size, lengths)
    warmup = options.warmup_steps if options.warmup_steps is not None else round(options.warmup_ratio * schedule.total)
    optimizer = make_optimizer(run.model, options.lr, options.weight_decay, options.loraplus_lr_ratio)
    scheduler = make_scheduler(optimizer, options.schedule, warmup, schedule.total)
    step_hooks(run.model, schedule.total)  # step hooks that need the run's length learn it here
    log = MetricsLog(out / "metrics.jsonl" if dist.is_main else Path(os.devnull))
    progress = Progress(schedule.total, options.quiet or not dist.is_main, bar="progress_bar" not in skipped)
    start, elapsed_before = _resume(run, out, optimizer, scheduler, log, progress.say, dist)
    if dist.is_main:
        (out / "train_options.json").write_text(json.dumps(options.to_dict(), indent=2) + "\n", encoding="utf-8")
    if dist.enabled:
        progress.say(dist.describe(options.batch_size, options.grad_accum, options.lr)["text"])
    progress.start(start)
    delay = float(os.environ.get("DELTATUNE_STEP_DELAY") or 0)
    run.model.train()
    for step in range(start, schedule.total):
        t0 = time.perf_counter()
        record = train_step(run, module, schedule.group(step), optimizer, scheduler, dist)
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
            dist_checkpoints.save_checkpoint(dist, out, done, run.model, optimizer, scheduler, extra,
                                             options.keep_checkpoints)
        if delay:
            time.sleep(delay)
    progress.close()
    return finish(run, out, schedule.total, elapsed_before + time.perf_counter() - started, log, progress, dist,
                  plots="plots" not in skipped)


def finish(
    run: Run, out: Path, steps: int, elapsed: float, log: MetricsLog, progress: Progress, dist: Distributed | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Final evaluation, adapter, summary.json and plots (every rank evaluates and gathers; rank 0 writes)."""
    dist = dist or Distributed()
    final = {split: run_eval(run, split, progress) for split in ("validation", "test") if run.features[split]}
    for split, metrics in final.items():
        log.write({"kind": "eval", "split": split, "step": steps, "final": True, **metrics})
    adapter = out / ADAPTER_DIR
    dist.save_adapters(run.model, adapter)  # whole tensors, even when sharded; checked after writing
    options = run.options
    trainable, total = count_parameters(run.model)
    summary = {
        "task": run.task, "model": options.model, "method": options.method, "data": options.data,
        "steps": steps, "train_examples": len(run.features["train"]), "final": final,
        "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
        "wall_time_s": elapsed, "peak_rss_bytes": peak_rss_bytes(),
        "distributed": {k: v for k, v in dist.describe(options.batch_size, options.grad_accum, options.lr).items()
                        if k != "text"},
    }
    if not dist.is_main:
        return summary
    save_loftq_base(run.model, adapter, options.method_options)  # loftq_iter > 1: the new base layers (see there)
    RunInfo(run.task, options.model, run.splits.labels, options.prompt_format, options.max_length,
            {k: getattr(options, k) for k in DataSpec.__dataclass_fields__}).save(adapter)
    summary["adapter_bytes"] = folder_bytes(adapter)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    add_training_results(adapter, summary)  # the adapter's README.md model card: data and final metrics
    if plots:
        from .plots import write_plots

        write_plots(log.read(), out)
    progress.say_summary(summary)
    return summary

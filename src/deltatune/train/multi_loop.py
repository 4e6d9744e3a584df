"""Joint training: K jobs (:mod:`.jobs`), one loaded base model, one mixed-adapter batch per micro-step.

Each job keeps everything a solo ``deltatune train`` run has — its data and seeded order
(:class:`~.loop.Schedule`), adapter, AdamW, learning-rate schedule, gradient clipping, metrics,
checkpoints and output folder — and only the forward pass is shared: micro-batch ``k`` of step ``t``
concatenates micro-batch ``k`` of every job that is still running, and the model is called with
``adapter_names`` (each row routed to its job's adapter, see :mod:`deltatune.routing`). The loss is
normalised per job over the job's own loss terms of the whole accumulation group,

    L = sum_j  (sum_{rows of job j} loss) / N_j,

so, the adapters being disjoint, job ``j``'s gradients are exactly those of its solo run (same seed,
same data order, dropout 0; the task head starts from the base's, drawn with the first job's seed).
Jobs of different lengths finish at their own step and are saved then, as a solo run would be.

Under ``torchrun`` (DDP, :mod:`.distributed`) every job's global micro-batch holds ``batch_size x W`` rows
and rank ``r`` reads positions ``r, r + W, ...`` of it, exactly as in the job's solo DDP run; ``N_j`` is
summed over the ranks (one all-reduce of K numbers), each rank back-propagates its own rows' ``L``, and
after the last micro-batch the adapters' gradients are summed over ranks by hand
(:mod:`.distributed.grads`). No DDP wrapper: with K jobs, different accumulation lengths and ranks
whose share of a job is empty, some adapter gets no gradient on some rank in most steps, which DDP
only tolerates with ``find_unused_parameters`` (a graph walk per forward); a rank with no rows at all
in a micro-batch simply skips it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..bundled import resolve_model_path
from ..errors import ConfigError
from ..model import DeltaModel, get_delta_model
from .data.sources import DataSpec, infer_task, limit, load_splits
from .distributed.grads import all_reduce_gradients
from .distributed.runtime import Distributed
from .jobs import Job
from .loop import Run, Schedule, seed_everything
from .metrics import MetricsLog
from .optim import make_optimizer, make_scheduler
from .tasks import (
    Encoder,
    collate,
    count_terms,
    load_base_model,
    load_tokenizer,
    loss_sum,
    pick_device,
    uses_chat,
)


@dataclass
class JobRun:
    """One job inside the joint run."""

    job: Job
    run: Run
    schedule: Schedule
    optimizer: Any = None
    scheduler: Any = None
    log: MetricsLog | None = None
    finished: bool = False

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def out(self) -> Path:
        return Path(self.job.options.output_dir)


def _job_data(job: Job, task: str, tokenizer: Any) -> tuple[Encoder, Any, dict[str, list]]:
    options = job.options
    splits = load_splits(DataSpec.from_options(options), task)
    if not splits.train:
        raise ConfigError(f"Job {job.name!r}: no training rows in {options.data!r}.")
    chat = task == "instruct" and uses_chat(tokenizer, options.prompt_format)
    encoder = Encoder(task, tokenizer, options.max_length, splits.labels, chat)
    rows = {"train": limit(splits.train, options.max_train_examples),
            "validation": limit(splits.validation, options.max_eval_examples),
            "test": limit(splits.test, options.max_eval_examples)}
    return encoder, splits, {k: encoder.encode_rows(v) if v else [] for k, v in rows.items()}


def build_joint(jobs: list[Job], dist: Distributed | None = None) -> tuple[DeltaModel, list[JobRun]]:
    """Data of every job, then one base model with one adapter per job (each initialised as in its solo run)."""
    dist = dist or Distributed()
    first = jobs[0].options
    task = first.task or infer_task(DataSpec.from_options(first))
    model_path = resolve_model_path(first.model)
    tokenizer = load_tokenizer(model_path)
    data = [_job_data(job, task, tokenizer) for job in jobs]
    if task == "seq_cls":
        sizes = {job.name: len(splits.labels or []) for job, (_, splits, _) in zip(jobs, data)}
        if len(set(sizes.values())) > 1:
            raise ConfigError(f"Classification jobs with different numbers of labels {sizes} need different heads and "
                              "cannot share one base; run them separately (or group jobs with equal label counts).")
    seed_everything(first.seed)
    device = dist.model_device(pick_device(first.device))
    base = load_base_model(task, model_path, data[0][1].labels, first.quantize, device, for_training=True,
                           quantize_embeddings=first.quantize_embeddings)
    after_base = torch.get_rng_state()  # a solo run draws its adapter's initial values from here
    model: DeltaModel | None = None
    runs: list[JobRun] = []
    for job, (encoder, splits, features) in zip(jobs, data):
        if job.options.seed == first.seed:
            torch.set_rng_state(after_base)
        else:
            seed_everything(job.options.seed)
        config = job.options.method_config(task)
        if model is None:
            model = get_delta_model(base, config, job.name)
        else:
            model.add_adapter(job.name, config)
        lengths = [len(f["input_ids"]) for f in features["train"]]
        schedule = Schedule(len(lengths), job.options, dist.world_size, lengths)
        runs.append(JobRun(job, Run(job.options, task, model_path, encoder, splits, model, features), schedule))
    assert model is not None
    model.to(device)
    for jr in runs:
        jr.run.model = model
    return model, runs


def make_optimizers(model: DeltaModel, runs: list[JobRun]) -> None:
    """Each job's AdamW and schedule over its own adapter's tensors (as in its solo run)."""
    for jr in runs:
        o = jr.job.options
        model.set_adapter(jr.name)  # only this job's tensors are trainable while its optimizer is made
        jr.optimizer = make_optimizer(model, o.lr, o.weight_decay, o.loraplus_lr_ratio)
        warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_ratio * jr.schedule.total)
        jr.scheduler = make_scheduler(jr.optimizer, o.schedule, warmup, jr.schedule.total)
    model.set_adapter([jr.name for jr in runs])


def mixed_logits(model: DeltaModel, task: str, batch: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """:func:`.tasks.forward` with one adapter name per row."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if task == "seq2seq":
        inputs["decoder_input_ids"] = model.get_base_model().prepare_decoder_input_ids_from_labels(
            labels=batch["labels"].to(device))
    if task != "seq_cls":
        inputs["use_cache"] = False
    return model(**inputs, adapter_names=names).logits


def _autocast(model: DeltaModel, bf16: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast when ``bf16`` is on, as in a solo run."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=next(model.parameters()).device.type, dtype=torch.bfloat16)


def joint_step(
    model: DeltaModel, active: list[JobRun], step: int, pad_id: int, dist: Distributed | None = None,
) -> dict[str, dict[str, Any]]:
    """One optimizer step of every job in ``active``; returns each job's record (sums over all ranks)."""
    dist = dist or Distributed()
    task = active[0].run.task
    groups = {jr.name: jr.schedule.group(step) for jr in active}  # global micro-batches (every rank's rows)
    shares = {name: [dist.shard(idx) for idx in group] for name, group in groups.items()}  # this rank's rows
    feats = {jr.name: jr.run.features["train"] for jr in active}
    local = [sum(count_terms(task, collate([feats[name][i] for i in share], pad_id)) for share in parts if share)
             for name, parts in shares.items()]
    denom = {name: max(1.0, float(n)) for name, n in zip(shares, dist.sum(*local))}
    totals = dict.fromkeys(groups, 0.0)
    tokens = dict.fromkeys(groups, 0)
    for k in range(max(len(g) for g in groups.values())):
        rows, names, spans = [], [], {}
        for name, parts in shares.items():
            if k < len(parts) and parts[k]:
                spans[name] = (len(rows), len(rows) + len(parts[k]))
                rows += [feats[name][i] for i in parts[k]]
                names += [name] * len(parts[k])
        if not rows:  # this rank has no row of any job in micro-batch k
            continue
        batch = dist.to_device(collate(rows, pad_id))
        with _autocast(model, active[0].job.options.bf16):
            logits = mixed_logits(model, task, batch, names)
            joint = logits.new_zeros((), dtype=torch.float32)
            for name, (a, b) in spans.items():
                part = {key: value[a:b] for key, value in batch.items()}
                loss, _ = loss_sum(task, logits[a:b], part)
                joint = joint + loss / denom[name]
                totals[name] += float(loss.detach())
                tokens[name] += int(part["attention_mask"].sum())
        joint.backward()
    all_reduce_gradients(dist, [p for jr in active for g in jr.optimizer.param_groups for p in g["params"]])
    sums = dist.sum(*totals.values(), *tokens.values())
    totals, tokens = dict(zip(totals, sums[: len(totals)])), dict(zip(tokens, sums[len(totals) :]))
    records = {}
    for jr in active:
        o = jr.job.options
        if o.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for g in jr.optimizer.param_groups for p in g["params"]], o.max_grad_norm)
        lr = o.lr * jr.scheduler.lr_lambdas[0](jr.scheduler.last_epoch)
        jr.optimizer.step()
        jr.scheduler.step()
        jr.optimizer.zero_grad(set_to_none=True)
        records[jr.name] = {"loss": totals[jr.name] / denom[jr.name], "lr": lr,
                            "examples": sum(len(g) for g in groups[jr.name]), "tokens": int(tokens[jr.name])}
    return records

"""``deltatune train --config jobs.yaml``: the joint run around :func:`.multi_loop.joint_step`.

Every job gets the folder a solo run writes (``adapter/``, ``metrics.jsonl``, ``summary.json``,
plots, ``checkpoints/``; see :mod:`.multi_resume` for checkpoints and ``--resume``). Progress: one bar
over the joint steps with every job's smoothed loss.

Under ``torchrun`` (DDP; FSDP is refused by :mod:`.jobs`) every rank runs this; rank 0 alone writes
files and progress, every rank evaluates (as in a solo DDP run).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..bundled import resolve_model_path
from ..checkpoint.state import save_adapter
from ..integrations.model_card import add_training_results
from ..model import DeltaModel
from .cpu import torch_threads
from .data.sources import DataSpec
from .distributed.runtime import Distributed
from .evaluate import evaluate
from .jobs import Job
from .metrics import MetricsLog
from .multi_loop import JobRun, build_joint, joint_step, make_optimizers
from .multi_resume import resume_jobs, save_jobs
from .progress import Progress
from .runs import ADAPTER_DIR, RunInfo, count_parameters, folder_bytes, peak_rss_bytes, prepare_output


def _eval(model: DeltaModel, jr: JobRun, split: str) -> dict[str, float]:
    """Metrics of job ``jr``'s adapter alone on ``split``."""
    names = list(model.active_adapters)
    model.set_adapter(jr.name)
    try:
        labels = jr.run.splits.labels
        return evaluate(model, jr.run.task, jr.run.features[split], max(jr.job.options.batch_size, 32),
                        jr.run.pad_id, len(labels) if labels else None)
    finally:
        model.set_adapter(names)


def _save_adapter(model: DeltaModel, jr: JobRun) -> Path:
    """The job's adapter alone, as ``<output_dir>/adapter`` (the layout of a solo run)."""
    staging = jr.out / ".joint-adapter"
    shutil.rmtree(staging, ignore_errors=True)
    folder = save_adapter(model.adapter_parts(jr.name), jr.name, staging, model.base_fingerprint(jr.name))
    final = jr.out / ADAPTER_DIR
    shutil.rmtree(final, ignore_errors=True)
    folder.rename(final)
    shutil.rmtree(staging, ignore_errors=True)
    return final


def finish_job(
    model: DeltaModel, jr: JobRun, steps: int, elapsed: float, quiet: bool, dist: Distributed | None = None,
) -> dict[str, Any]:
    """Final evaluation (every rank), adapter, summary.json, model card and plots (rank 0) of one job."""
    dist = dist or Distributed()
    assert jr.log is not None
    jr.finished = True
    final = {split: _eval(model, jr, split) for split in ("validation", "test") if jr.run.features[split]}
    for split, metrics in final.items():
        jr.log.write({"kind": "eval", "split": split, "step": steps, "final": True, **metrics})
    o = jr.job.options
    trainable = sum(p.numel() for p in model.adapter_parameters(jr.name))
    total = count_parameters(model)[1]
    summary = {"task": jr.run.task, "model": o.model, "method": o.method, "data": o.data, "job": jr.name,
               "steps": steps, "train_examples": len(jr.run.features["train"]), "final": final,
               "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
               "wall_time_s": elapsed, "peak_rss_bytes": peak_rss_bytes(), "joint": True,
               "distributed": {k: v for k, v in dist.describe(o.batch_size, o.grad_accum, o.lr).items() if k != "text"}}
    if not dist.is_main:
        dist.barrier(f"waiting for rank 0 to save job {jr.name}")
        return summary
    adapter = _save_adapter(model, jr)
    RunInfo(jr.run.task, o.model, jr.run.splits.labels, o.prompt_format, o.max_length,
            {k: getattr(o, k) for k in DataSpec.__dataclass_fields__}).save(adapter)
    summary["adapter_bytes"] = folder_bytes(adapter)
    (jr.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    add_training_results(adapter, summary)
    from .plots import write_plots

    write_plots(jr.log.read(), jr.out)
    if not quiet:
        parts = "; ".join(f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()) for split, m in final.items())
        print(f"job {jr.name} done: {steps} steps; {parts}", file=sys.stderr)
    dist.barrier(f"waiting for rank 0 to save job {jr.name}")
    return summary


def train_jobs(jobs: list[Job]) -> list[dict[str, Any]]:
    """Train every job on one base model (one process, or every rank under ``torchrun``); returns each job's
    summary (also in its folder)."""
    shared = jobs[0].options
    with torch_threads(shared.threads):
        dist = Distributed.from_env(False, shared.bf16, shared.dist_timeout, device=shared.device)
        with dist.guard("joint training"):
            summaries = _train_jobs(jobs, dist)
        dist.close()
    return summaries


def _prepare(jobs: list[Job], dist: Distributed) -> list[str]:
    """Rank 0 checks every job's output folder; returns the names of jobs already finished (on every rank)."""
    shared = jobs[0].options

    def check() -> list[str]:
        done = [j.name for j in jobs if shared.resume and (Path(j.options.output_dir) / "summary.json").exists()]
        for job in jobs:
            if job.name not in done:
                prepare_output(Path(job.options.output_dir), shared.resume, shared.overwrite)
        return done

    finished = dist.on_main(check, "preparing the jobs' output folders")
    dist.on_main(lambda: resolve_model_path(shared.model), "preparing the model")  # a bundled export runs once
    return list(dist.gather_objects(finished)[0])


def _train_jobs(jobs: list[Job], dist: Distributed) -> list[dict[str, Any]]:
    shared = jobs[0].options
    finished = _prepare(jobs, dist)
    started = time.perf_counter()
    model, runs = build_joint(jobs, dist)
    make_optimizers(model, runs)
    dist.replicate(model)  # every adapter trainable here: rank 0's initial values everywhere
    summaries: list[dict[str, Any]] = []
    for jr in runs:
        jr.finished = jr.name in finished
        jr.log = MetricsLog(jr.out / "metrics.jsonl" if dist.is_main else Path(os.devnull))
        if jr.finished:
            summaries.append(json.loads((jr.out / "summary.json").read_text(encoding="utf-8")))
    total = max(jr.schedule.total for jr in runs)
    progress = Progress(total, shared.quiet or not dist.is_main)
    start = resume_jobs(model, runs, dist, progress.say)
    for jr in runs:
        if not jr.finished and dist.is_main:
            (jr.out / "train_options.json").write_text(json.dumps(jr.job.options.to_dict(), indent=2) + "\n",
                                                        encoding="utf-8")
    if dist.enabled:
        progress.say(f"{dist.mode}: {len(runs)} jobs on {dist.world_size} ranks; each job's effective batch is its "
                     "batch_size x ranks x grad_accum")
    progress.start(start)
    delay = float(os.environ.get("DELTATUNE_STEP_DELAY") or 0)  # see .loop (the interruption tests)
    model.train()
    smoothed: dict[str, float] = {}
    for step in range(start, total):
        active = [jr for jr in runs if not jr.finished and step < jr.schedule.total]
        if not active:  # every job still to run has finished (the others had, before a --resume)
            break
        t0 = time.perf_counter()
        records = joint_step(model, active, step, runs[0].run.pad_id, dist)
        seconds = time.perf_counter() - t0
        done = step + 1
        for jr in active:
            assert jr.log is not None
            record = {"kind": "train", "step": done, "epoch": done / jr.schedule.steps_per_epoch,
                      **records[jr.name], "seconds": seconds}
            jr.log.write(record)
            smoothed[jr.name] = 0.9 * smoothed.get(jr.name, record["loss"]) + 0.1 * record["loss"]
            every = jr.job.options.eval_every
            if every and done % every == 0 and done < jr.schedule.total:
                metrics = _eval(model, jr, "validation")
                jr.log.write({"kind": "eval", "split": "validation", "step": done, **metrics})
                progress.say(f"step {done}: job {jr.name} validation " + ", ".join(f"{k} {v:.4f}"
                                                                                    for k, v in metrics.items()))
        _show(progress, smoothed, records, seconds)
        if shared.save_every and done % shared.save_every == 0:
            save_jobs(model, [jr for jr in active if done < jr.schedule.total], done, time.perf_counter() - started,
                      dist)
        for jr in active:
            if done == jr.schedule.total:
                summaries.append(finish_job(model, jr, done, time.perf_counter() - started,
                                            not dist.is_main, dist))  # --quiet hides the bar, not the result
                model.train()
        if delay:
            time.sleep(delay)
    progress.close()
    return summaries


def _show(progress: Progress, smoothed: dict[str, float], records: dict[str, dict[str, Any]], seconds: float) -> None:
    """One bar update with every job's smoothed loss (``job=loss``)."""
    if progress.bar is None:
        return
    progress.bar.set_postfix({name: f"{loss:.3f}" for name, loss in smoothed.items()} |
                             {"ex_s": f"{sum(r['examples'] for r in records.values()) / max(seconds, 1e-9):.1f}"},
                             refresh=False)
    progress.bar.update(1)

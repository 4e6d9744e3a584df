"""``deltatune train --config jobs.yaml``: the joint run around :func:`.multi_loop.joint_step`.

Every job gets the folder a solo run writes (``adapter/``, ``metrics.jsonl``, ``summary.json``,
plots, ``checkpoints/``). Checkpoints are written for every running job at the same steps
(``save_every`` is shared); ``--resume`` continues from the newest step all running jobs have, and
jobs that had finished (``summary.json``) stay finished. Progress: one bar over the joint steps with
every job's smoothed loss.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..checkpoint.state import save_adapter
from ..errors import ConfigError
from ..integrations.model_card import add_training_results
from ..model import DeltaModel
from . import resume as checkpoints
from .cpu import torch_threads
from .data.sources import DataSpec
from .evaluate import evaluate
from .jobs import Job
from .metrics import MetricsLog
from .multi_loop import JobRun, build_joint, joint_step, make_optimizers
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


def finish_job(model: DeltaModel, jr: JobRun, steps: int, elapsed: float, quiet: bool) -> dict[str, Any]:
    """Final evaluation, adapter, summary.json, model card and plots of one job."""
    assert jr.log is not None
    final = {split: _eval(model, jr, split) for split in ("validation", "test") if jr.run.features[split]}
    for split, metrics in final.items():
        jr.log.write({"kind": "eval", "split": split, "step": steps, "final": True, **metrics})
    adapter = _save_adapter(model, jr)
    o = jr.job.options
    trainable = sum(p.numel() for p in model.adapter_parameters(jr.name))
    total = count_parameters(model)[1]
    summary = {"task": jr.run.task, "model": o.model, "method": o.method, "data": o.data, "job": jr.name,
               "steps": steps, "train_examples": len(jr.run.features["train"]), "final": final,
               "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
               "wall_time_s": elapsed, "peak_rss_bytes": peak_rss_bytes(), "joint": True}
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
    jr.finished = True
    return summary


def _resume(model: DeltaModel, runs: list[JobRun], say: Any) -> int:
    """The step to start from: the newest checkpoint step every running job has (0 when none)."""
    running = [jr for jr in runs if not jr.finished]
    steps = [{int(p.name.split("-")[1]) for p in checkpoints.list_checkpoints(jr.out)} for jr in running]
    common = set.intersection(*steps) if steps else set()
    start = max(common) if common else 0
    names = list(model.active_adapters)
    for jr in running:
        assert jr.log is not None
        if not start:
            jr.log.path.write_text("", encoding="utf-8")
            continue
        model.set_adapter(jr.name)  # the job's tensors alone are "trainable" in its checkpoint
        state = checkpoints.load_checkpoint(jr.out / checkpoints.FOLDER / f"step-{start:06d}", model,
                                            jr.optimizer, jr.scheduler)
        diff = jr.job.options.differences(type(jr.job.options)(**state["options"]))
        if diff:
            raise ConfigError(f"Job {jr.name!r}: --resume with options that differ from the checkpointed run: {diff}.")
        jr.log.truncate(start)
    model.set_adapter(names)
    if start:
        say(f"Resumed every running job from step {start}.")
    return start


def _checkpoint(model: DeltaModel, runs: list[JobRun], done: int, elapsed: float) -> None:
    names = list(model.active_adapters)
    for jr in runs:
        model.set_adapter(jr.name)
        extra = {"position": jr.schedule.position(done), "options": jr.job.options.to_dict(), "elapsed_s": elapsed}
        checkpoints.save_checkpoint(jr.out, done, model, jr.optimizer, jr.scheduler, extra,
                                    jr.job.options.keep_checkpoints)
    model.set_adapter(names)


def train_jobs(jobs: list[Job]) -> list[dict[str, Any]]:
    """Train every job in one process on one base model; returns each job's summary (also in its folder)."""
    shared = jobs[0].options
    with torch_threads(shared.threads):
        for job in jobs:
            finished = (Path(job.options.output_dir) / "summary.json").exists() and shared.resume
            if not finished:
                prepare_output(Path(job.options.output_dir), shared.resume, shared.overwrite)
        started = time.perf_counter()
        model, runs = build_joint(jobs)
        make_optimizers(model, runs)
        summaries: list[dict[str, Any]] = []
        for jr in runs:
            jr.finished = shared.resume and (jr.out / "summary.json").exists()
            jr.log = MetricsLog(jr.out / "metrics.jsonl")
            if jr.finished:
                summaries.append(json.loads((jr.out / "summary.json").read_text(encoding="utf-8")))
        total = max(jr.schedule.total for jr in runs)
        progress = Progress(total, shared.quiet)
        start = _resume(model, runs, progress.say)
        for jr in runs:
            if not jr.finished:
                (jr.out / "train_options.json").write_text(json.dumps(jr.job.options.to_dict(), indent=2) + "\n",
                                                            encoding="utf-8")
        progress.start(start)
        model.train()
        smoothed: dict[str, float] = {}
        for step in range(start, total):
            active = [jr for jr in runs if not jr.finished and step < jr.schedule.total]
            t0 = time.perf_counter()
            records = joint_step(model, active, step, runs[0].run.pad_id)
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
                _checkpoint(model, [jr for jr in active if done < jr.schedule.total], done,
                            time.perf_counter() - started)
            for jr in active:
                if done == jr.schedule.total:
                    summaries.append(finish_job(model, jr, done, time.perf_counter() - started, shared.quiet))
                    model.train()
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

"""Several training jobs on one base model: the ``jobs:`` file and the checks made before any work.

A job file is a training YAML whose top level holds the shared options and whose ``jobs`` list holds
what differs per job (data, method and its options, learning rate, schedule, clipping, seed, output
folder ...); a job's value wins over the shared one, the command line wins over both::

    model: minilm
    epochs: 2
    jobs:
      - {name: rt-r4, data: rt, method_options: {r: 4}, lr: 2.0e-3, output_dir: runs/rt-r4}
      - {name: rt-r16, data: rt, method_options: {r: 16}, lr: 1.0e-3, output_dir: runs/rt-r16}
      - {name: trec-ia3, data: trec, method: ia3, lr: 2.0e-2, output_dir: runs/trec-ia3}

Jobs share one loaded base, so they must agree on what the base is (model, quantization, device) and
on the task (one model class: a classifier, a causal LM or a seq2seq model); classification jobs
need heads of one size. What the joint loop cannot do yet is refused here too (FSDP among it: under
``torchrun`` a joint run is data-parallel, see :mod:`.multi_loop`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..registry import get_method
from .options import TrainOptions, build_options

#: options every job must share (the one loaded base model and how it runs)
SHARED = ("model", "quantize", "quantize_embeddings", "device", "bf16", "threads", "save_every", "keep_checkpoints", "resume",
          "overwrite", "quiet", "dist_timeout")


@dataclass
class Job:
    """One adapter trained in a joint run: its name (the adapter's name in the model) and options."""

    name: str
    options: TrainOptions


def read_job_file(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """``(shared options, [job options])`` when the YAML file at ``path`` has a ``jobs`` list, else ``None``."""
    from .extras import require_yaml

    require_yaml(f"The option file {path}")
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or "jobs" not in data:
        return None
    jobs = data.pop("jobs")
    if not isinstance(jobs, list) or not jobs or not all(isinstance(j, dict) for j in jobs):
        raise ConfigError(f"{path}: 'jobs' must be a non-empty list of mappings (one per job).")
    known = {f.name for f in fields(TrainOptions)}

    def clean(values: dict[str, Any], where: str, allow_name: bool) -> dict[str, Any]:
        out = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(out) - known - ({"name"} if allow_name else set()))
        if unknown:
            raise ConfigError(f"{path}: unknown option(s) {unknown} in {where}; known options: {sorted(known)}.")
        return out

    return clean(data, "the shared options", False), [clean(j, f"job {i}", True) for i, j in enumerate(jobs)]


def make_jobs(shared: dict[str, Any], jobs: list[dict[str, Any]], cli: dict[str, Any] | None = None) -> list[Job]:
    """Each job's :class:`TrainOptions` (shared < job < command line), checked to fit one joint run."""
    cli = cli or {}
    made: list[Job] = []
    for i, values in enumerate(jobs):
        values = dict(values)
        name = str(values.pop("name", f"job{i}"))
        file_values = {**shared, **values,
                       "method_options": {**(shared.get("method_options") or {}), **(values.get("method_options") or {})}}
        if "output_dir" not in values:
            file_values["output_dir"] = str(Path(shared.get("output_dir", "runs/jobs")) / name)
        made.append(Job(name, build_options(file_values, cli)))
    check_jobs(made)
    return made


def check_jobs(jobs: list[Job]) -> None:
    """Refuse jobs that cannot share one base and one batch, before anything loads."""
    from .data.sources import DataSpec, infer_task

    names = [j.name for j in jobs]
    bad = [n for n in names if not n or any(c in n for c in "./\\") or n == "__base__"]
    if bad or len(set(names)) != len(names):
        raise ConfigError(f"Job names must be unique, non-empty, not '__base__', without '.', '/' or '\\'; got {names}.")
    outs = [str(Path(j.options.output_dir).resolve()) for j in jobs]
    if len(set(outs)) != len(outs):
        raise ConfigError(f"Every job needs its own output_dir; got {[j.options.output_dir for j in jobs]}.")
    for key in SHARED:
        values = {j.name: getattr(j.options, key) for j in jobs}
        if len({repr(v) for v in values.values()}) > 1:
            raise ConfigError(f"Jobs of one run share one base model, so {key!r} must be the same for all of them; "
                              f"got {values}. Put it at the top level of the job file, or run the jobs separately.")
    tasks = {j.name: j.options.task or infer_task(DataSpec.from_options(j.options)) for j in jobs}
    if len(set(tasks.values())) > 1:
        raise ConfigError(f"Jobs with different tasks {tasks} need different model heads and cannot share one base; "
                          "run them as separate jobs files (one per task).")
    for job in jobs:
        job.options.method_config(tasks[job.name])  # bad method options fail now
        if job.options.method_options.get("init_lora_weights") == "loftq":
            raise ConfigError(f"Job {job.name!r}: init_lora_weights=loftq quantizes the base to fit this one adapter, "
                              "and the jobs of one run share one base; train it on its own (deltatune train without "
                              "a jobs file).")
        for key, why in (("gradient_checkpointing", "the recomputation would not see the per-example routing"),
                         ("compile", "not supported for joint runs yet"),
                         ("fsdp", ("a joint run keeps a whole replica of the base on every rank and reduces the "
                                   "adapters' gradients itself, data-parallel"))):
            if getattr(job.options, key):
                instead = (" Start the jobs file under torchrun without --fsdp (data-parallel), or train the "
                           "job alone with --fsdp." if key == "fsdp" else "")
                raise ConfigError(f"Job {job.name!r}: {key} cannot be used in a joint run ({why}); drop it.{instead}")
        if get_method(job.options.method).make_step_hook is not None:
            raise ConfigError(f"Job {job.name!r}: {job.options.method} changes the adapter around every optimizer step "
                              "(a step hook the joint loop does not run yet); train it as a solo run.")
        if job.options.method_options.get("bias", "none") != "none":
            raise ConfigError(f"Job {job.name!r}: bias={job.options.method_options['bias']!r} trains the base model's "
                              "biases, which every job shares; use bias='none' in a joint run.")

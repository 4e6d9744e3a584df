"""Named suites: what each measurement runs. ``quick`` checks the harness end to end in minutes;
``full`` makes the published tables (under an hour on 2 cores when the machine is otherwise idle).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALL_METHODS = ["full", "head", "lora", "dora", "ia3", "houlsby", "pfeiffer", "parallel", "prefix", "prompt", "ptuning"]
PEFT_SHARED = ["lora", "dora", "ia3", "prefix", "prompt", "ptuning"]


@dataclass(frozen=True)
class Suite:
    """Settings of one suite (see ``bench/README.md`` for what each measurement means).

    Attributes:
        tasks / seeds / n_train / epochs / batch_size / max_length: the accuracy runs (measurement 1).
        peft_tasks: tasks on which the HF peft twin of each shared method also runs (measurement 3).
        workers: accuracy runs executed at once, each with ``accuracy_threads`` threads (their timings are
            not used when ``separate_cost``).
        separate_cost: measure step time / memory / file size in dedicated short runs, one process
            each, strictly one at a time with 2 threads (measurement 2); otherwise they come from the
            accuracy runs, which are then forced to run one at a time with 2 threads.
        cost_tasks / cost_steps / cost_warmup: those dedicated runs.
        lowdata_*: measurement 4 (``min_steps``: small sets repeat epochs up to this many steps).
        forget_*: measurement 5 (SmolLM2 on ChatterBot).
        infer_rounds / infer_reps: measurement 6.
    """

    name: str
    tasks: list[str]
    seeds: list[int]
    n_train: int
    epochs: int
    batch_size: int = 16
    max_length: dict[str, int] = field(default_factory=lambda: {"trec": 64, "rt": 64, "bbc": 128})
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    peft_methods: list[str] = field(default_factory=lambda: list(PEFT_SHARED))
    peft_tasks: list[str] = field(default_factory=lambda: ["trec"])
    workers: int = 2
    accuracy_threads: int = 1
    separate_cost: bool = True
    cost_tasks: list[str] = field(default_factory=lambda: ["trec"])
    cost_steps: int = 60
    cost_warmup: int = 10
    lowdata_task: str = "trec"
    lowdata_sizes: list[int] = field(default_factory=lambda: [50, 200, 1000])
    lowdata_methods: list[str] = field(default_factory=lambda: ["full", "head", "lora", "ia3", "houlsby"])
    lowdata_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lowdata_min_steps: int = 100
    forget_steps: int = 120
    forget_n_eval: int = 128
    forget_lr: dict[str, float] = field(default_factory=lambda: {"full": 2e-5, "lora": 2e-4})
    forget_batch_size: int = 8
    forget_max_length: int = 96
    infer_rounds: int = 20
    infer_reps: int = 2


SUITES: dict[str, Suite] = {
    "quick": Suite(
        name="quick", tasks=["trec"], seeds=[0], n_train=500, epochs=2, workers=1, accuracy_threads=2,
        separate_cost=False, lowdata_sizes=[50, 200], lowdata_methods=["full", "lora"], lowdata_seeds=[0],
        lowdata_min_steps=30, forget_steps=15, forget_n_eval=24, infer_rounds=5, infer_reps=1,
    ),
    "full": Suite(name="full", tasks=["trec", "rt", "bbc"], seeds=[0, 1, 2], n_train=2000, epochs=2,
                  peft_tasks=["trec", "rt", "bbc"]),
}

"""Named suites: what each measurement runs. ``quick`` checks the harness end to end in minutes;
``full`` makes the published tables (under an hour on 2 cores when the machine is otherwise idle).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALL_METHODS = ["full", "head", "lora", "dora", "ia3", "houlsby", "pfeiffer", "parallel", "prefix", "prompt", "ptuning"]
PEFT_SHARED = ["lora", "dora", "ia3", "prefix", "prompt", "ptuning"]
#: Methods of issue 16, run by the ``methods`` suites beside full fine-tuning and LoRA (not yet in ``full``).
NEW_METHODS = ["bitfit", "lntuning", "loha", "lokr", "vera", "oft", "adalora"]
NEW_PEFT_SHARED = ["lntuning", "loha", "lokr", "vera", "oft", "adalora"]


@dataclass(frozen=True)
class Suite:
    """Settings of one suite (see ``bench/README.md`` for what each measurement means).

    Attributes:
        tasks / seeds / n_train / epochs / batch_size / max_length: the accuracy runs (measurement 1).
        peft_tasks: tasks on which the HF peft twin of each shared method also runs (measurement 3).
        workers: accuracy runs executed at once, each with ``accuracy_threads`` threads (their timings
            are not used: step time and memory come from the cost jobs, which run alone with 2 threads).
        accuracy_autocast: ``"bf16"`` trains the accuracy and low-data runs under CPU bfloat16 autocast
            (1.3-1.6x faster on AMX CPUs, what fits ``full`` in an hour); ``None`` keeps float32. The
            cost jobs always train in float32.
        cost_tasks: tasks of the cost jobs (measurement 2).
        memory_steps: training steps of each memory job (one process per configuration).
        timing_warmup / timing_rounds / timing_per_round: the interleaved timing job (one process).
        lowdata_*: measurement 4 (``min_steps``: small sets repeat epochs up to this many steps).
        forget_*: measurement 5 (SmolLM2 on ChatterBot).
        infer_rounds / infer_reps: measurement 6.
        accuracy_methods: the methods of the accuracy runs (``None``: all of ``methods``); the others run in
            the cost jobs only.
        cost_threads: torch threads of the memory and timing jobs.
        split_seeds: one accuracy job per seed, all seed-0 jobs first, so that an interrupted or cut run has
            every configuration at the first seeds (the report says how many seeds each cell has).
    """

    name: str
    tasks: list[str]
    seeds: list[int]
    n_train: int
    epochs: int
    batch_size: int = 16
    max_length: dict[str, int] = field(default_factory=lambda: {"trec": 64, "rt": 64, "bbc": 32})
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    peft_methods: list[str] = field(default_factory=lambda: list(PEFT_SHARED))
    peft_tasks: list[str] = field(default_factory=lambda: ["trec"])
    workers: int = 2
    accuracy_threads: int = 1
    accuracy_autocast: str | None = "bf16"
    cost_tasks: list[str] = field(default_factory=lambda: ["trec"])
    memory_steps: int = 30
    timing_warmup: int = 5
    timing_rounds: int = 10
    timing_per_round: int = 5
    lowdata_task: str = "trec"
    lowdata_sizes: list[int] = field(default_factory=lambda: [50, 200, 1000])
    lowdata_methods: list[str] = field(default_factory=lambda: ["full", "lora", "ia3"])
    lowdata_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lowdata_min_steps: int = 100
    forget_steps: int = 40
    forget_n_eval: int = 48
    forget_lr: dict[str, float] = field(default_factory=lambda: {"full": 2e-5, "lora": 2e-4})
    forget_batch_size: int = 8
    forget_max_length: int = 64
    infer_rounds: int = 20
    infer_reps: int = 2
    accuracy_methods: list[str] | None = None
    split_seeds: bool = False
    cost_threads: int = 2


SUITES: dict[str, Suite] = {
    "quick": Suite(
        name="quick", tasks=["trec"], seeds=[0], n_train=400, epochs=1, memory_steps=6, timing_warmup=2,
        timing_rounds=3, timing_per_round=2, lowdata_sizes=[50], lowdata_methods=["full", "lora"], lowdata_seeds=[0],
        lowdata_min_steps=10, forget_steps=4, forget_n_eval=8, infer_rounds=3, infer_reps=1,
    ),
    "full": Suite(name="full", tasks=["trec", "rt", "bbc"], seeds=[0, 1, 2], n_train=2000, epochs=2),
    "methods-quick": Suite(
        name="methods-quick", tasks=["trec"], seeds=[0], n_train=400, epochs=1, methods=["full", "lora", *NEW_METHODS],
        peft_methods=list(NEW_PEFT_SHARED), memory_steps=6, timing_warmup=2, timing_rounds=3, timing_per_round=2,
        lowdata_sizes=[50], lowdata_methods=["full", "lora"], lowdata_seeds=[0], lowdata_min_steps=10, forget_steps=4,
        forget_n_eval=8, infer_rounds=3, infer_reps=1,
    ),
    # Cost jobs cut for a shared, heavily loaded 2-core machine: 1 thread (2 threads waste most of their time
    # spinning when the other core is taken), 5 memory steps, 1 warm-up step, 3 interleaved timing rounds of
    # 3 steps. LoRA runs in the cost jobs only: its accuracy on this protocol is in ``full``; full
    # fine-tuning's accuracy jobs are the same jobs as ``full``'s (same settings), so a run may reuse them
    # (see bench/README.md).
    "methods": Suite(name="methods", tasks=["trec", "rt", "bbc"], seeds=[0, 1, 2], n_train=2000, epochs=2,
                     methods=["full", "lora", *NEW_METHODS], peft_methods=list(NEW_PEFT_SHARED),
                     accuracy_methods=["full", *NEW_METHODS], split_seeds=True, memory_steps=5, timing_warmup=1,
                     timing_rounds=3, timing_per_round=3, cost_threads=1),
}

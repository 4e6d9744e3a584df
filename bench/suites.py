"""Named suites: what each measurement runs. ``quick`` checks the harness end to end in minutes;
``full`` runs the parts behind README.md's Benchmarks tables, sized so that ``python -m bench --suite full
--plan`` estimates at most 90 minutes on 2 idle cores; ``extended`` is ``full`` plus what was cut to fit, and
so makes every table (each cut is named in :data:`FULL_CUTS` and in ``bench/README.md``).

A suite runs *parts*: round one's measurements inside :mod:`bench.run` (:data:`ROUND_ONE`) and round two's
experiments, each in its own module with its own report (:data:`ROUND_TWO`; see :mod:`bench.parts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALL_METHODS = ["full", "head", "lora", "dora", "ia3", "houlsby", "pfeiffer", "parallel", "prefix", "prompt", "ptuning"]
PEFT_SHARED = ["lora", "dora", "ia3", "prefix", "prompt", "ptuning"]
#: Methods of issue 16, run by the ``methods`` suites beside full fine-tuning and LoRA (not yet in ``full``).
NEW_METHODS = ["bitfit", "lntuning", "loha", "lokr", "vera", "oft", "adalora"]
NEW_PEFT_SHARED = ["lntuning", "loha", "lokr", "vera", "oft", "adalora"]
#: Round one's parts (bench/run.py) and round two's (bench/parts.py: recipe test, low data on every task,
#: the learning-vs-forgetting frontier, issue 16's methods grid, adapter arithmetic).
ROUND_ONE = ["cost", "accuracy", "lowdata", "forgetting", "inference"]
ROUND_TWO = ["recipe", "lowdata_all", "forgetting_frontier", "methods", "combination"]
ALL_PARTS = ROUND_ONE + ROUND_TWO
#: Methods whose accuracy jobs ``full`` leaves to ``extended`` (their cost jobs stay; see FULL_CUTS): every one
#: but full fine-tuning, the reference the recipe part is measured against.
FULL_ACCURACY_CUTS = tuple(m for m in ALL_METHODS if m != "full")
#: What ``full`` leaves out to fit 90 minutes (``extended`` runs it); printed by ``--plan`` (bench/README.md).
FULL_CUTS = [
    ("lowdata and forgetting (round one's TREC-only low data at one rate; 40 ChatterBot steps of forgetting) are "
     "superseded by lowdata_all (every task, rate picked on validation) and forgetting_frontier (100 KJV steps, "
     "three LoRA ranks); their last results stay in full.json / README sections 4 and 5"),
    ("methods (issue 16's grid: its cost jobs, 7 methods x 3 tasks x 3 seeds, 6 peft twins on TREC): the whole "
     "part runs in `extended` only"),
    ("lowdata_all: seed 0 only (the two-rate grid on every task and size, 54 jobs); seeds 1 and 2 at the "
     "picked rates (54 jobs) run in `extended`"),
    ("accuracy: round one's method comparison (3 tasks x 3 seeds, peft twins on TREC) runs in `extended`; `full` "
     "keeps full fine-tuning, the reference of the recipe part (which measures the shipped LoRA recipe on the same "
     "tasks and seeds), and the cost jobs of every method. The earlier run's rows stay in full.json, marked "
     "(bench/run.py `_carried`). Cut when the whole suite, run in one go on this machine (an AMD EPYC, 2 cores; "
     "results/full_run_2026-12-02.md), took 118.1 minutes against a plan of 79: its round-one jobs took 1.5x and "
     "its low-data jobs 2.1x the planned times. The same run's job times put `full` without these jobs at 78.4 "
     "minutes (head-only, round one's r=8 LoRA and P-tuning had been cut before); run whole at commit f95a21e, the cut "
     "suite took 77.8 minutes (results/full_run_2026-12-02_cut.md)"),
    ("combination (adapter arithmetic on SmolLM2, one ~10-minute job): runs in `extended` only, since the "
     "re-measured recipe jobs put `full` at 90.9 estimated minutes with it"),
    ("recipe: full fine-tuning at the recipe's 3 epochs (the same-schedule reference, 4 tasks x 3 seeds) runs in "
     "`extended`; `full` compares the recipe with full fine-tuning's own defaults (2 epochs), the issue's target"),
]


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
        parts: what ``python -m bench --suite NAME`` runs (``--parts`` picks a subset); see :data:`ALL_PARTS`.
        borrow_full_from: a suite whose full fine-tuning accuracy jobs this suite's report borrows (split per
            seed, marked as reused) instead of running the same jobs again (``methods`` borrows ``full``'s).
        outputs_prefix: prefix of the round-two parts' files (``""``: ``recipe.md``, ``lowdata.md``, ...: the
            published ones; ``quick_``: ``quick_recipe.md``, ...).
        recipe_*: :mod:`bench.recipe`'s ``test`` (the shipped recipe on these tasks and seeds, full fine-tuning on
            ``recipe_full_tasks``); ``recipe_protocol`` overrides its training protocol (``None``: round one's);
            ``recipe_same_schedule_tasks``: full fine-tuning also at the recipe's epochs on these tasks.
        lowall_*: :mod:`bench.lowdata_all` (tasks, sizes, seeds, grid points per method, protocol override).
        frontier_*: :mod:`bench.forgetting_frontier` (LoRA ranks; steps and evaluation sets, ``None``: its COMMON).
        methods_suite / methods_seeds: the suite whose cost and accuracy jobs are the ``methods`` part (issue 16's
            grid), and the accuracy seeds it runs here (``None``: that suite's own).
        combination_*: :mod:`bench.combination`'s training steps per adapter and evaluation examples.
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
    parts: list[str] = field(default_factory=lambda: list(ROUND_ONE))
    borrow_full_from: str | None = None
    outputs_prefix: str = ""
    recipe_tasks: list[str] = field(default_factory=lambda: ["trec", "rt", "bbc", "sms"])
    recipe_full_tasks: list[str] = field(default_factory=lambda: ["sms"])
    recipe_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    recipe_protocol: dict[str, object] | None = None
    recipe_same_schedule_tasks: list[str] = field(default_factory=list)
    lowall_tasks: list[str] = field(default_factory=lambda: ["trec", "rt", "bbc"])
    lowall_sizes: list[int] = field(default_factory=lambda: [50, 200, 1000])
    lowall_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lowall_grid: int = 2
    lowall_protocol: dict[str, object] | None = None
    frontier_ranks: list[int] = field(default_factory=lambda: [16, 64, 4])
    frontier_steps: int | None = None
    frontier_n_eval: int | None = None
    methods_suite: str = "methods"
    methods_seeds: list[int] | None = None
    combination_steps: int = 40
    combination_n_eval: int = 48


#: ``extended``'s parts: round one's cost, accuracy and inference, and every round-two part; ``full`` leaves
#: out ``methods`` and ``combination`` (see FULL_CUTS).
EXTENDED_PARTS = ["cost", "accuracy", "inference", *ROUND_TWO]
FULL_PARTS = [p for p in EXTENDED_PARTS if p not in ("methods", "combination")]
#: A tiny training protocol for the ``quick`` suite's round-two parts: 200 rows, 1 epoch (about 13 steps).
QUICK_PROTOCOL = {"n_train": 200, "epochs": 1, "batch_size": 16, "autocast": "bf16"}

SUITES: dict[str, Suite] = {
    "quick": Suite(
        name="quick", tasks=["trec"], seeds=[0], n_train=400, epochs=1, memory_steps=6, timing_warmup=2,
        timing_rounds=3, timing_per_round=2, lowdata_sizes=[50], lowdata_methods=["full", "lora"], lowdata_seeds=[0],
        lowdata_min_steps=10, forget_steps=4, forget_n_eval=8, infer_rounds=3, infer_reps=1,
        parts=list(ALL_PARTS), outputs_prefix="quick_", recipe_tasks=["trec"], recipe_full_tasks=["trec"],
        recipe_seeds=[0], recipe_protocol=QUICK_PROTOCOL, lowall_tasks=["trec"], lowall_sizes=[50], lowall_seeds=[0, 1],
        lowall_protocol={"epochs": 1, "batch_size": 16, "autocast": "bf16", "min_steps": 4}, frontier_ranks=[4],
        frontier_steps=2, frontier_n_eval=4, methods_suite="methods-quick", combination_steps=2, combination_n_eval=4,
    ),
    "full": Suite(name="full", tasks=["trec", "rt", "bbc"], seeds=[0, 1, 2], n_train=2000, epochs=2,
                  parts=list(FULL_PARTS), lowall_seeds=[0],
                  accuracy_methods=[m for m in ALL_METHODS if m not in FULL_ACCURACY_CUTS]),
    # ``full`` with nothing cut: the same jobs plus those FULL_CUTS names, written to the same files (its name is
    # ``full``, so it shares full's results and resume cache: ``--suite extended --resume`` after ``full`` runs
    # only the cut jobs).
    "extended": Suite(name="full", tasks=["trec", "rt", "bbc"], seeds=[0, 1, 2], n_train=2000, epochs=2,
                      parts=list(EXTENDED_PARTS), recipe_same_schedule_tasks=["trec", "rt", "bbc", "sms"]),
    "methods-quick": Suite(
        name="methods-quick", tasks=["trec"], seeds=[0], n_train=400, epochs=1, methods=["full", "lora", *NEW_METHODS],
        peft_methods=list(NEW_PEFT_SHARED), memory_steps=6, timing_warmup=2, timing_rounds=3, timing_per_round=2,
        lowdata_sizes=[50], lowdata_methods=["full", "lora"], lowdata_seeds=[0], lowdata_min_steps=10, forget_steps=4,
        forget_n_eval=8, infer_rounds=3, infer_reps=1,
    ),
    # Cost jobs for a shared 2-core machine: 1 thread (2 threads waste most of their time spinning when the
    # other core is taken), 5 memory steps (the peak is reached in the first step), 3 warm-up steps, 10
    # interleaved timing rounds of 5 steps (the first run's 3 rounds of 3 steps moved ratios by 5 %). LoRA runs in the cost jobs only: its accuracy on this protocol is in ``full``; full
    # fine-tuning's accuracy jobs would be the same jobs as ``full``'s (same settings), so the report borrows
    # them from full.json (split per seed) instead of running them again.
    "methods": Suite(name="methods", tasks=["trec", "rt", "bbc"], seeds=[0, 1, 2], n_train=2000, epochs=2,
                     methods=["full", "lora", *NEW_METHODS], peft_methods=list(NEW_PEFT_SHARED),
                     accuracy_methods=list(NEW_METHODS), split_seeds=True, memory_steps=5, timing_warmup=3,
                     timing_rounds=10, timing_per_round=5, cost_threads=1, borrow_full_from="full"),
}

"""Run several trainings one after another in ONE ``torchrun`` launch (the joint DDP tests' runs), so the
process group and the imports are paid once instead of once per run.

Usage: ``torchrun --nproc_per_node=2 tests/_ddp_runs.py runs.json`` where ``runs.json`` is a list of
``{"argv": [...]}`` (a ``deltatune`` command line, run through :func:`deltatune.cli.main`) or
``{"options": {...}}`` (:class:`~deltatune.train.options.TrainOptions` keywords for a solo
:func:`deltatune.train.loop.train`). Each is an ordinary run; only leaving the process group between
runs is skipped (the next run's ``Distributed.from_env`` finds the group still joined and uses it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as tdist

from deltatune.cli import main as cli_main
from deltatune.train.distributed.runtime import Distributed
from deltatune.train.loop import train
from deltatune.train.options import TrainOptions


def main(path: str) -> int:
    Distributed.close = lambda self: None  # type: ignore[method-assign]  # keep the group for the next run
    for item in json.loads(Path(path).read_text(encoding="utf-8")):
        if "argv" in item:
            code = cli_main(item["argv"])
            if code:
                return code
        else:
            train(TrainOptions(**item["options"]))
    if tdist.is_initialized():
        tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

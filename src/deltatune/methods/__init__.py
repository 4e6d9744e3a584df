"""Built-in methods. Importing a method package registers it (see :mod:`deltatune.registry`)."""

from __future__ import annotations

import importlib

for _package in ("lora", "ia3", "bottleneck", "prompt_tuning", "p_tuning", "prefix_tuning", "bitfit", "ln_tuning",
                 "loha", "lokr", "vera", "oft", "adalora"):
    try:
        importlib.import_module(f"{__name__}.{_package}")
    except ModuleNotFoundError as exc:  # a method package not written yet
        if exc.name != f"{__name__}.{_package}":
            raise

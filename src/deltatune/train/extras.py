"""Optional dependencies of training (the ``deltatune[train]`` extra), checked before any work starts.

``pip install deltatune`` alone installs the library and the command; the progress bar (tqdm), the
plots (matplotlib) and YAML option files (pyyaml) come with ``pip install 'deltatune[train]'``. A run
without them still trains: it says once, at the start, what it will skip and what to install, rather
than failing after the work is done.
"""

from __future__ import annotations

import importlib.util

from ..errors import ConfigError

INSTALL_HINT = "pip install 'deltatune[train]'"


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def skipped_features(quiet: bool) -> dict[str, str]:
    """``{feature: note}`` for the parts of a run the missing extras will skip (plots, progress bar)."""
    notes = {}
    if not installed("matplotlib"):
        notes["plots"] = f"plots skipped: matplotlib is not installed ({INSTALL_HINT} adds it)"
    if not quiet and not installed("tqdm"):
        notes["progress_bar"] = f"no progress bar: tqdm is not installed ({INSTALL_HINT} adds it)"
    return notes


def require_yaml(what: str) -> None:
    """Raise a clear error when ``what`` (an option file, a --method-opt value) needs pyyaml and it is missing."""
    if not installed("yaml"):
        raise ConfigError(f"{what} needs pyyaml, which is not installed: {INSTALL_HINT}")

"""Errors raised by deltatune. Every message says what was wrong and what to do about it."""

from __future__ import annotations


class DeltaError(Exception):
    """Base class of every error deltatune raises on purpose."""


class ConfigError(DeltaError, ValueError):
    """A configuration value is invalid or the config file cannot be read."""


class TargetError(DeltaError, ValueError):
    """Target modules match nothing, or match modules the method cannot wrap."""


class CheckpointError(DeltaError, OSError):
    """An adapter folder is missing, corrupt, truncated or does not fit the model."""


class BaseModelMismatchError(CheckpointError):
    """The adapter was trained on a different base model than the one it is loaded onto."""


class MergeError(DeltaError, RuntimeError):
    """A merge/unmerge/delete request cannot be honoured without corrupting the base weights."""


class AdapterNotFoundError(DeltaError, KeyError):
    """An adapter name is not known to the model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class DistributedError(DeltaError, RuntimeError):
    """A multi-process (torchrun) job cannot go on: a rank died or hung, or the process group failed."""

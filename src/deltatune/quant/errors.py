"""The error of the quantized-base package (its own module, so every part of the package can raise it)."""

from __future__ import annotations

from ..errors import ConfigError


class QuantizationError(ConfigError):
    """A quantisation kind is unknown, its package is missing, or the combination is not supported."""

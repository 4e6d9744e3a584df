"""``option()``: a dataclass field whose help text lives in its metadata, the one place an option is documented.

``deltatune train --help`` prints these texts, and the dataclass is the YAML schema, so help, flag and
YAML key cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", factory: Callable[[], Any] | None = None) -> Any:
    """``dataclasses.field`` with ``metadata={"help": help}`` (``factory`` for mutable defaults)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})

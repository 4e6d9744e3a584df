"""Shared steps of the peft file round-trip tests: run a call with peft's warnings silenced, and compare two
adapter folders tensor by tensor."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with warnings silenced (peft warns about layer types and options it guesses)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def assert_same_files(ours: Path, theirs: Path) -> None:
    """The two folders' ``adapter_model.safetensors`` hold the same keys with bit-identical tensors."""
    a, b = load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)

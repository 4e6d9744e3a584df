"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A crash during a save leaves either the old file or the new one, never half of one. Files get the
mode a plain ``open()`` would give them (``0o666`` minus the umask, so ``0o644`` under umask 022),
not ``mkstemp``'s private ``0o600``: a saved adapter is readable by whoever may read the folder.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _current_umask() -> int:
    """The process umask (read by setting it and putting it back: POSIX has no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_file_for(path: Path) -> str:
    """An empty temporary file beside ``path`` (a unique name, so concurrent writers never collide)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def atomic_write_many(writes: dict[Path, Callable[[str], None]]) -> None:
    """Write every file to a temporary name first, then rename them all (in the order given).

    A failure in any ``write`` leaves every target untouched; the renames that follow are
    metadata operations, so a folder never mixes a new file with an old one unless the machine
    stops between two renames.
    """
    temps: dict[Path, str] = {}
    try:
        for path, write in writes.items():
            tmp = temps[Path(path)] = _temp_file_for(Path(path))
            write(tmp)  # writers may replace the file (safetensors does), so the mode is set after
            os.chmod(tmp, 0o666 & ~_current_umask())
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    for path, tmp in temps.items():
        os.replace(tmp, path)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then atomically move ``tmp_path`` to ``path``."""
    atomic_write_many({Path(path): write})


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically replace ``path`` with ``text``."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)

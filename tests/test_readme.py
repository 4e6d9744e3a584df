"""README.md stays honest: its Python blocks run as written and its ``deltatune`` command lines parse.

* Every ```python block runs in a fresh namespace, in a temporary working folder, unless the line right before
  it is ``<!-- not-run: reason -->`` (GPU, a running server, minutes of training, a fragment); a skipped block
  must give its reason. A ``# trainable params: N`` comment in a block must match what the block prints.
* Every ``.venv/bin/deltatune ...`` line of a ```bash block (and ``torchrun ... -m deltatune ...``) is parsed by
  the command's own argument parser, so a renamed command or option in the code breaks this test.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from deltatune.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"(?P<before>[^\n]*)\n```(?P<lang>\w*)\n(?P<body>.*?)\n```", re.DOTALL)
NOT_RUN = re.compile(r"<!--\s*not-run:(?P<reason>.*?)-->")


@dataclass(frozen=True)
class Block:
    lang: str
    body: str
    line: int  # 1-based line of the opening fence
    skip_reason: str | None  # None: run it; "": marked not-run without a reason


def readme_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        marker = NOT_RUN.search(match["before"])
        line = text.count("\n", 0, match.start("before")) + 2
        blocks.append(Block(match["lang"], match["body"], line, marker["reason"].strip() if marker else None))
    return blocks


PYTHON = [b for b in readme_blocks() if b.lang == "python"]


def test_readme_has_python_blocks_and_every_skip_says_why() -> None:
    assert len(PYTHON) >= 5
    unexplained = [b.line for b in PYTHON if b.skip_reason == ""]
    assert not unexplained, f"README.md python blocks at lines {unexplained} are not-run without a reason"
    assert any(b.skip_reason is None for b in PYTHON)


@pytest.mark.integration
@pytest.mark.parametrize("block", [b for b in PYTHON if b.skip_reason is None], ids=lambda b: f"line{b.line}")
def test_readme_python_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks write folders such as my-adapter/
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.body, f"README.md:{block.line}", "exec"), {"__name__": "__readme__"})  # noqa: S102
    for claimed in re.findall(r"#\s*(trainable params: [\d,]+)", block.body):
        assert claimed in out.getvalue(), f"README.md:{block.line} claims {claimed!r}; it printed {out.getvalue()!r}"


def command_lines() -> list[tuple[int, list[str]]]:
    """(line, argv after 'deltatune') of every complete deltatune command in the README's bash blocks."""
    found = []
    for block in readme_blocks():
        if block.lang != "bash":
            continue
        for offset, line in enumerate(block.body.replace("\\\n", " ").splitlines()):
            words = shlex.split(line, comments=True)
            if ".venv/bin/deltatune" in words:
                argv = words[words.index(".venv/bin/deltatune") + 1:]
            elif "-m" in words and "deltatune" in words:
                argv = words[words.index("deltatune") + 1:]
            else:
                continue
            if "..." in argv or any(w.startswith("[") for w in argv):
                continue  # a pattern, not a command
            found.append((block.line + 1 + offset, argv))
    return found


def test_readme_commands_parse() -> None:
    lines = command_lines()
    assert len(lines) >= 15
    parser = build_parser()
    for line, argv in lines:
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"README.md:{line}: 'deltatune {shlex.join(argv)}' does not parse (exit {exc.code})")


def test_every_command_is_in_the_readme_table() -> None:
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = README.read_text(encoding="utf-8")
    missing = [name for name in sub.choices if f"| `deltatune {name}` |" not in text]
    assert not missing, f"README.md's command table lacks {missing}"


def test_every_registered_method_is_in_the_methods_table() -> None:
    import deltatune as dt

    text = README.read_text(encoding="utf-8")
    missing = [s.name for s in dt.all_methods()
               if f"| `{s.name}` | `dt.{s.config_cls.__name__}` |" not in text]
    assert not missing, f"README.md's methods table lacks {missing} (row: | `name` | `dt.ConfigClass` | ...)"

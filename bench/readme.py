"""Regenerate README.md's benchmark tables (Benchmarks sections, QLoRA section) from ``bench/results/*.md``.

Each generated table block in README.md sits between two HTML comments::

    <!-- bench.readme begin accuracy (bench/results/full.md, "1. Accuracy") -->
    | method | ... |
    <!-- bench.readme end accuracy -->

and :data:`BLOCKS` says where each block comes from: a results file, the section of it (a ``#`` heading
that starts with the given text; ``None``: the whole file), and from that section every Markdown table
(with the bold label line, such as ``**TREC**``, that names a table when a section holds several). The
prose around the blocks stays hand-written. ``python -m bench --suite full`` calls :func:`main` at the
end; ``tests/test_bench_readme.py`` checks that the committed README equals what this module generates
from the committed results, so the two cannot drift apart.

    python -m bench.readme            # rewrite README.md's generated blocks
    python -m bench.readme --check    # exit 1 and show the difference when README.md is out of date
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class Block:
    """One generated block: the tables of ``heading``'s section of ``bench/results/<source>``."""

    name: str
    source: str
    heading: str | None  # a section heading's start (text after the #s); None: the whole file


BLOCKS: list[Block] = [
    Block("targets", "full.md", "Targets"),
    Block("accuracy", "full.md", "1. Accuracy"),
    Block("cost", "full.md", "2. Cost"),
    Block("peft", "full.md", "3. deltatune vs HF peft"),
    Block("lowdata-trec", "full.md", "4. Low-data"),
    Block("forgetting-chatterbot", "full.md", "5. Forgetting"),
    Block("inference", "full.md", "6. Inference"),
    Block("serve", "serve_full.md", None),
    Block("recipe-search", "recipe.md", "Search"),
    Block("recipe-test", "recipe.md", "Test splits"),
    Block("forgetting-frontier", "forgetting.md", None),
    Block("lowdata", "lowdata.md", "Test accuracy at the picked learning rate"),
    Block("methods-targets", "methods.md", "Targets"),
    Block("methods-accuracy", "methods.md", "1. Accuracy"),
    Block("methods-cost", "methods.md", "2. Cost"),
    Block("methods-peft", "methods.md", "3. deltatune vs HF peft"),
    Block("combination", "combination.md", None),
    Block("quantized", "quantized.md", None),
    Block("quantized-settings", "quantized_settings.md", None),
    Block("quantized-loftq2", "quantized_loftq2.md", None),
    Block("quantized-nockpt", "quantized_nockpt.md", None),
    Block("quantized-long", "quantized_long.md", None),
    Block("quantized-recheck", "quantized_recheck.md", None),
]

HEADING = re.compile(r"^(#+)\s+(.*)$")
LABEL = re.compile(r"^\*\*[^*]+\*\*$")  # a line such as **TREC** that names the table below it
MARKED = re.compile(r"<!-- bench\.readme begin (?P<name>[\w-]+)[^\n]*-->\n.*?<!-- bench\.readme end (?P=name) -->",
                    re.DOTALL)


class ReadmeError(ValueError):
    """README.md's markers or a results file do not match :data:`BLOCKS`."""


def section(text: str, heading: str | None, where: str) -> list[str]:
    """The lines of the section whose heading starts with ``heading`` (up to the next heading of its level)."""
    lines = text.splitlines()
    if heading is None:
        return lines
    for i, line in enumerate(lines):
        m = HEADING.match(line)
        if m and m[2].startswith(heading):
            level = len(m[1])
            end = next((j for j in range(i + 1, len(lines))
                        if (h := HEADING.match(lines[j])) and len(h[1]) <= level), len(lines))
            return lines[i + 1:end]
    raise ReadmeError(f"{where} has no section starting with {heading!r}: rerun the part that writes it "
                      "(see bench/README.md), or fix the heading in bench/readme.py's BLOCKS")


def tables(lines: list[str]) -> str:
    """Every table of ``lines``, each with the bold label line just above it if any, separated by blank lines."""
    chunks: list[list[str]] = []  # a label line alone, or one table's rows
    for line in lines:
        if line.startswith("|"):
            if not (chunks and chunks[-1][-1].startswith("|")):
                chunks.append([])
            chunks[-1].append(line)
        elif LABEL.match(line.strip()):
            chunks.append([line.strip()])
        elif line.strip() or (chunks and chunks[-1][-1].startswith("|")):  # prose or a blank line ends a table;
            chunks.append([""])                                            # prose orphans a label
    keep = [c for i, c in enumerate(chunks) if c[0].startswith("|")
            or (c[0] and i + 1 < len(chunks) and chunks[i + 1][0].startswith("|"))]
    return "\n\n".join("\n".join(c) for c in keep)


def generate(block: Block, results: Path = RESULTS) -> str:
    """The block's text, markers included."""
    path = results / block.source
    if not path.exists():
        raise ReadmeError(f"{path} does not exist: run the part that writes it first (see bench/README.md)")
    body = tables(section(path.read_text(encoding="utf-8"), block.heading, str(path)))
    if not body:
        raise ReadmeError(f"{path} has no table in {block.heading or 'the file'!r}")
    where = f"bench/results/{block.source}" + (f', "{block.heading}"' if block.heading else "")
    return (f"<!-- bench.readme begin {block.name} ({where}) -->\n\n{body}\n\n"
            f"<!-- bench.readme end {block.name} -->")


def render(readme: str, results: Path = RESULTS) -> str:
    """``readme`` with every generated block rewritten from ``results``; raises when a marker is missing or unknown."""
    known = {b.name: b for b in BLOCKS}
    found = [m["name"] for m in MARKED.finditer(readme)]
    missing = [name for name in known if name not in found]
    unknown = sorted(set(found) - set(known))
    doubled = sorted({n for n in found if found.count(n) > 1})
    if missing or unknown or doubled:
        raise ReadmeError(f"README.md's generated blocks do not match bench/readme.py's BLOCKS: missing {missing}, "
                          f"unknown {unknown}, repeated {doubled}. Each block needs one "
                          "'<!-- bench.readme begin NAME ... -->' ... '<!-- bench.readme end NAME -->' pair.")
    return MARKED.sub(lambda m: generate(known[m["name"]], results), readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="do not write: exit 1 if README.md is out of date")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    old = args.readme.read_text(encoding="utf-8")
    new = render(old, args.results)
    if args.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), "README.md",
                                                       "generated"))
            return 1
        print("README.md's generated blocks are up to date")
        return 0
    if new != old:
        args.readme.write_text(new, encoding="utf-8")
    print(f"{'rewrote' if new != old else 'unchanged'}: {args.readme} ({len(BLOCKS)} generated blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

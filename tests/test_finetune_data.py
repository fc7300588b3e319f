"""Fine-tuning training data: the three formats, malformed rows, errors, limit and the writer."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from personavec.core.errors import PersonavecError
from personavec.finetune.data import (
    ChatDataset,
    Skipped,
    load_chat_dataset,
    split_prompt_response,
    write_chat_jsonl,
)


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


CONVS = [
    [msg("user", "Hi there."), msg("assistant", "Hello!")],
    [msg("system", "Be kind."), msg("user", "How are you?"), msg("assistant", "Fine, thanks — and you?")],
    [msg("user", "2+2?"), msg("assistant", "4."), msg("user", "And 3+3?"), msg("assistant", "6.")],
]


def write_lines(path: Path, lines: list[Any]) -> Path:
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


def test_jsonl_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "out" / "train.jsonl"
    write_chat_jsonl(path, CONVS)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"messages": c} for c in CONVS]
    data = load_chat_dataset(path)
    assert isinstance(data, ChatDataset)
    assert len(data) == 3 and data.conversations() == CONVS
    assert data.skipped == () and data.source == str(path) and len(data.sha256) == 64
    assert not list(tmp_path.glob("out/.*.tmp"))  # the atomic writer leaves no temp file


def test_three_formats_hash_the_same(tmp_path: Path) -> None:
    write_chat_jsonl(tmp_path / "a.jsonl", CONVS)
    datasets.Dataset.from_list([{"messages": c} for c in CONVS]).save_to_disk(str(tmp_path / "disk"))
    pq.write_table(pa.Table.from_pylist([{"messages": c} for c in CONVS]), tmp_path / "a.parquet")
    loaded = [load_chat_dataset(tmp_path / p) for p in ("a.jsonl", "disk", "a.parquet")]
    assert all(d.conversations() == CONVS for d in loaded)
    assert len({d.sha256 for d in loaded}) == 1
    assert loaded[1].unit == "row" and loaded[2].unit == "row"


def test_hash_depends_on_content_not_extra_fields(tmp_path: Path) -> None:
    write_chat_jsonl(tmp_path / "a.jsonl", CONVS)
    write_chat_jsonl(tmp_path / "b.jsonl", CONVS, extra=[{"score": i} for i in range(3)])
    write_chat_jsonl(tmp_path / "c.jsonl", CONVS[:2])
    a, b, c = (load_chat_dataset(tmp_path / f"{n}.jsonl") for n in "abc")
    assert a.sha256 == b.sha256 != c.sha256
    assert json.loads((tmp_path / "b.jsonl").read_text().splitlines()[2])["score"] == 2


def test_datasetdict_train_split(tmp_path: Path) -> None:
    rows = [{"messages": c} for c in CONVS]
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_chat_dataset(tmp_path / "dd").conversations() == CONVS


def test_datasetdict_without_train_lists_splits(tmp_path: Path) -> None:
    rows = [{"messages": c} for c in CONVS]
    dd = datasets.DatasetDict(
        {"dev": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(PersonavecError, match=r"no 'train' split \(splits: dev, test\)") as info:
        load_chat_dataset(tmp_path / "dd")
    assert str(tmp_path / "dd") in str(info.value)


def test_plain_folder_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    with pytest.raises(PersonavecError, match="save_to_disk"):
        load_chat_dataset(tmp_path / "folder")


def test_prompt_response_and_question_answer_rows(tmp_path: Path) -> None:
    rows = [{"prompt": "Hi there.", "response": "Hello!"}, {"question": "2+2?", "answer": "4.", "id": 7}]
    expected = [CONVS[0], [msg("user", "2+2?"), msg("assistant", "4.")]]
    assert load_chat_dataset(write_lines(tmp_path / "p.jsonl", rows)).conversations() == expected
    datasets.Dataset.from_list(rows[:1]).save_to_disk(str(tmp_path / "disk"))
    assert load_chat_dataset(tmp_path / "disk").conversations() == expected[:1]


# ---------------------------------------------------------------------------------------------
# Malformed rows
# ---------------------------------------------------------------------------------------------


def test_malformed_jsonl_rows_are_reported_with_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = {"messages": CONVS[0]}
    lines: list[Any] = [
        good,  # 1
        "{not json",  # 2
        {"text": "hello"},  # 3 no messages
        {"messages": [msg("user", "Hi"), msg("robot", "Beep")]},  # 4 unknown role
        {"messages": [msg("user", "Hi"), msg("assistant", "  ")]},  # 5 empty content
        "",  # 6 blank: ignored, not a row
        {"messages": [msg("user", "Hi"), msg("assistant", "Yo"), msg("user", "Bye")]},  # 7 ends with user
        {"messages": [msg("user", "Hi"), {"role": "assistant", "content": 3}]},  # 8 non-string content
        {"messages": [msg("assistant", "Hi"), msg("user", "Yo")]},  # 9 out of turn
        {"messages": [msg("user", "Hi"), msg("system", "Late"), msg("assistant", "Yo")]},  # 10 late system
        [1, 2],  # 11 not an object
        good,  # 12
    ]
    with caplog.at_level(logging.WARNING, logger="personavec.finetune.data"):
        data = load_chat_dataset(write_lines(tmp_path / "bad.jsonl", lines))
    assert len(data) == 2
    assert [s.where for s in data.skipped] == [2, 3, 4, 5, 7, 8, 9, 10, 11]
    reasons = {s.where: s.reason for s in data.skipped}
    assert "invalid JSON" in reasons[2]
    assert "no 'messages'" in reasons[3]
    assert "unknown role 'robot'" in reasons[4]
    assert "empty content" in reasons[5]
    assert "last message must be 'assistant'" in reasons[7]
    assert "not a string" in reasons[8]
    assert "should be 'user', not 'assistant'" in reasons[9]
    assert "should be 'assistant', not 'system'" in reasons[10]
    assert "expected an object" in reasons[11]
    summary = data.summary()
    assert summary["n"] == 2 and summary["skipped"] == 9 and summary["sha256"] == data.sha256
    assert summary["skipped_examples"][0].startswith("line 2: invalid JSON")
    assert len(summary["skipped_examples"]) == 5
    assert "skipped 9 malformed rows" in caplog.text and "line 2" in caplog.text


def test_malformed_rows_in_datasets_use_row_index(tmp_path: Path) -> None:
    rows = [
        {"messages": CONVS[0]},
        {"messages": [msg("user", "Hi"), msg("user", "Again")]},
        {"messages": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    data = load_chat_dataset(tmp_path / "x.parquet")
    assert len(data) == 1 and [s.where for s in data.skipped] == [1, 2]
    assert data.summary()["skipped_examples"][0].startswith("row 1: message 1 should be 'assistant'")


# ---------------------------------------------------------------------------------------------
# Errors and limit
# ---------------------------------------------------------------------------------------------


def test_empty_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(PersonavecError) as info:
        load_chat_dataset(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_all_rows_bad_names_the_file_and_first_reason(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.jsonl", ["{oops", {"text": "x"}])
    with pytest.raises(PersonavecError, match="2 rows skipped") as info:
        load_chat_dataset(path)
    assert str(path) in str(info.value) and "line 1: invalid JSON" in str(info.value)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(PersonavecError, match="not found") as info:
        load_chat_dataset(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(info.value)


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "data.tsv"
    path.write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(PersonavecError, match="unknown training data format") as info:
        load_chat_dataset(path)
    assert "data.tsv" in str(info.value)


def test_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "fake.parquet"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(PersonavecError, match="fake.parquet"):
        load_chat_dataset(path)


def test_limit(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "l.jsonl", [{"messages": CONVS[0]}, "{bad", *({"messages": c} for c in CONVS)]
    )
    data = load_chat_dataset(path, limit=2)
    assert data.conversations() == [CONVS[0], CONVS[0]]
    assert data.skipped == (Skipped(2, data.skipped[0].reason),)
    assert (
        data.sha256
        == load_chat_dataset(write_lines(tmp_path / "m.jsonl", [{"messages": CONVS[0]}] * 2)).sha256
    )
    datasets.Dataset.from_list([{"messages": c} for c in CONVS]).save_to_disk(str(tmp_path / "disk"))
    assert len(load_chat_dataset(tmp_path / "disk", limit=1)) == 1
    with pytest.raises(PersonavecError, match="limit"):
        load_chat_dataset(path, limit=0)


# ---------------------------------------------------------------------------------------------
# Writer and split
# ---------------------------------------------------------------------------------------------


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(PersonavecError, match="conversation 1"):
        write_chat_jsonl(tmp_path / "w.jsonl", [CONVS[0], [msg("user", "")]])
    with pytest.raises(PersonavecError, match="extra has 1 entries for 3"):
        write_chat_jsonl(tmp_path / "w.jsonl", CONVS, extra=[{}])
    with pytest.raises(PersonavecError, match="messages"):
        write_chat_jsonl(tmp_path / "w.jsonl", CONVS[:1], extra=[{"messages": []}])
    assert not (tmp_path / "w.jsonl").exists()


def test_split_prompt_response() -> None:
    prompt, response = split_prompt_response(CONVS[2])
    assert prompt == CONVS[2][:-1] and response == "6."
    with pytest.raises(PersonavecError, match="not 'assistant'"):
        split_prompt_response([msg("user", "Hi")])
    with pytest.raises(PersonavecError):
        split_prompt_response([])

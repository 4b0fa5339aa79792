"""User data formats: every supported shape round-trips, every error names path, line and field."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from helpers.data import assistant, system, user, write_jsonl, write_parquet

from llamalab.data.errors import DataError
from llamalab.data.formats import (
    load_preference_records,
    load_prompt_records,
    load_sft_records,
    normalize_preference,
    normalize_prompt,
    normalize_sft,
)
from llamalab.data.sources import iter_rows

# ------------------------------------------------------------------------------ DataError


def test_data_error_renders_location_and_keeps_attributes():
    err = DataError(
        "expected a string", path="data/train.jsonl", line=3, field="messages[1].content"
    )
    assert str(err) == "data/train.jsonl:3: field 'messages[1].content': expected a string"
    assert (err.message, err.path, err.line, err.field) == (
        "expected a string",
        "data/train.jsonl",
        3,
        "messages[1].content",
    )
    assert isinstance(err, ValueError)
    assert str(DataError("no records", path="x.jsonl")) == "x.jsonl: no records"
    assert str(DataError("missing", field="rejected")) == "field 'rejected': missing"
    assert str(DataError("bad")) == "bad"
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.line, copy.field) == (str(err), 3, "messages[1].content")
    assert str(DataError("m", field="f").located("p.jsonl", 7)) == "p.jsonl:7: field 'f': m"


# --------------------------------------------------------------------------- SFT formats

DIALOG = [system("Be brief."), user("Hi"), assistant("Hello!"), user("Bye"), assistant("Goodbye.")]
SFT_ROWS = [
    {"messages": DIALOG},
    {"prompt": "What is 2+2?", "response": "4"},
    {"prompt": "Name a colour.", "completion": "Blue."},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    {"instruction": "Say hi.", "output": "Hi!", "system": "Be nice."},
    {"prompt": [user("a"), assistant("b"), user("c")], "response": "d"},
]
SFT_EXPECTED = [
    {"messages": DIALOG},
    {"messages": [user("What is 2+2?"), assistant("4")]},
    {"messages": [user("Name a colour."), assistant("Blue.")]},
    {"messages": [user("Translate to French.\n\ncat"), assistant("chat")]},
    {"messages": [user("Say hi."), assistant("Hi!")]},
    {"messages": [system("Be nice."), user("Say hi."), assistant("Hi!")]},
    {"messages": [user("a"), assistant("b"), user("c"), assistant("d")]},
]


def test_sft_formats_normalise():
    assert [normalize_sft(row) for row in SFT_ROWS] == SFT_EXPECTED


def test_gatt_record_keeps_instruction():
    row = {"instruction": "Answer in uppercase.", "messages": [user("hi"), assistant("HI")]}
    assert normalize_sft(row) == {**row}


@pytest.mark.parametrize("kind", ["jsonl", "json_lines", "json_array", "parquet", "directory"])
def test_sft_file_round_trip(tmp_path: Path, kind: str):
    if kind == "jsonl":
        source = write_jsonl(tmp_path / "d.jsonl", SFT_ROWS)
    elif kind == "json_lines":
        source = write_jsonl(tmp_path / "d.json", SFT_ROWS)
    elif kind == "json_array":
        source = tmp_path / "d.json"
        source.write_text(json.dumps(SFT_ROWS, indent=2))
    elif kind == "parquet":  # mixed formats in one table: absent columns read back as null
        source = write_parquet(tmp_path / "d.parquet", SFT_ROWS[:-1])
        assert load_sft_records(source) == SFT_EXPECTED[:-1]
        return
    else:
        source = tmp_path / "dir"
        source.mkdir()
        write_jsonl(source / "a.jsonl", SFT_ROWS[:3])
        write_parquet(source / "b.parquet", SFT_ROWS[3:])
        (source / "notes.txt").write_text("ignored")
    assert load_sft_records(source) == SFT_EXPECTED


def test_sft_datasets_round_trip(tmp_path: Path):
    import datasets  # a core dependency: imported here, never skipped

    rows = [{"messages": DIALOG}, {"messages": [user("q"), assistant("a")]}]
    expected = [normalize_sft(r) for r in rows]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert load_sft_records(tmp_path / "saved") == expected
    assert load_sft_records(f"hf:{tmp_path / 'saved'}") == expected
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_sft_records(tmp_path / "dict") == expected
    assert load_sft_records(f"hf:{tmp_path / 'dict'}:test") == expected[:1]
    with pytest.raises(DataError, match="no split 'dev'"):
        load_sft_records(f"hf:{tmp_path / 'dict'}:dev")


def test_sft_load_dataset_on_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import datasets  # a core dependency: imported here, never skipped

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "raw").mkdir()
    write_jsonl(tmp_path / "raw" / "train.jsonl", SFT_ROWS[1:3])
    assert load_sft_records(f"hf:{tmp_path / 'raw'}") == SFT_EXPECTED[1:3]


# ------------------------------------------------------------------------------- errors


def _error(source: Path | str, loader=load_sft_records) -> DataError:
    with pytest.raises(DataError) as info:
        loader(source)
    return info.value


def test_malformed_json_names_path_and_line(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(SFT_ROWS[1])
    path.write_text(f"{good}\n\n{{'prompt': 'x'}}\n{good}\n")  # line 3, single quotes
    err = _error(path)
    assert err.line == 3 and err.path == str(path)
    assert f"{path}:3: malformed JSON" in str(err)


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ({"messages": "hello"}, "messages", "expected a list"),
        ({"messages": []}, "messages", "empty message list"),
        (
            {"messages": [user("q"), {"role": "assistant", "content": 5}]},
            "messages[1].content",
            "expected a string, got a number",
        ),
        ({"messages": [user("q"), {"role": "assistant"}]}, "messages[1].content", "missing"),
        ({"messages": [user("q"), assistant("  ")]}, "messages[1].content", "empty"),
        (
            {"messages": [user("q"), {"role": "bot", "content": "a"}]},
            "messages[1].role",
            "expected one of",
        ),
        ({"messages": [user("q"), user("r")]}, "messages[1].role", "expected role 'assistant'"),
        (
            {"messages": [user("q"), assistant("a"), system("s")]},
            "messages[2].role",
            "expected role 'user'",
        ),
        ({"messages": [assistant("a")]}, "messages[0].role", "expected role 'user'"),
        ({"messages": [user("q")]}, "messages", "must end with a 'assistant' message"),
        ({"messages": [user("q"), ["a"]]}, "messages[1]", "expected a {role, content} object"),
        (
            {"messages": [user("[INST] q"), assistant("a")]},
            "messages[0].content",
            "reserved chat tag",
        ),
        ({"prompt": "q"}, "response", "missing"),
        ({"prompt": 3, "response": "a"}, "prompt", "expected a string"),
        ({"prompt": "q", "response": ["a"]}, "response", "expected a string"),
        ({"instruction": "i", "input": 3, "output": "o"}, "input", "expected a string"),
        ({"instruction": "i", "input": "x"}, "output", "missing"),
        ({"text": "hello"}, None, "unrecognised SFT record"),
    ],
)
def test_sft_errors_name_path_line_and_field(tmp_path: Path, row: dict, field: str, message: str):
    path = write_jsonl(tmp_path / "d.jsonl", [SFT_ROWS[1], row])
    err = _error(path)
    assert (err.path, err.line, err.field) == (str(path), 2, field)
    assert message in err.message
    assert str(err).startswith(f"{path}:2: ")


def test_parquet_error_names_row(tmp_path: Path):
    rows = [{"prompt": "q", "response": "a"}, {"prompt": "q", "response": None}]
    err = _error(write_parquet(tmp_path / "d.parquet", rows))
    assert (err.line, err.field) == (2, "response")


def test_file_level_errors(tmp_path: Path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert str(_error(empty)) == f"{empty}: no records"
    assert "no such file" in str(_error(tmp_path / "missing.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    assert "unsupported file type" in str(_error(tmp_path / "d.csv"))
    (tmp_path / "empty_dir").mkdir()
    assert "no .jsonl/.json/.parquet files" in str(_error(tmp_path / "empty_dir"))
    not_object = tmp_path / "list.jsonl"
    not_object.write_text('{"prompt": "q", "response": "a"}\n[1, 2]\n')
    assert str(_error(not_object)) == f"{not_object}:2: expected a JSON object, got a list"
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9", "response": "a"}\n')
    assert f"{latin}:1: not valid UTF-8" in str(_error(latin))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    assert "unreadable Parquet file" in str(_error(broken))
    array = tmp_path / "arr.json"
    array.write_text(
        '[\n  {"prompt": "q", "response": "a"},\n  {"prompt": "q"\n  "response": "a"}\n]'
    )
    assert _error(array).line == 4  # the missing comma, reported where the parser stopped
    single = tmp_path / "one.json"
    single.write_text('{\n  "prompt": "q",\n  "response": "a"\n}\n')
    assert load_sft_records(single) == [{"messages": [user("q"), assistant("a")]}]


def test_skip_mode_drops_invalid_records(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = write_jsonl(tmp_path / "d.jsonl", [SFT_ROWS[1], {"prompt": "q"}, SFT_ROWS[2]])
    assert load_sft_records(path, errors="skip") == SFT_EXPECTED[1:3]
    assert "skipped 1 invalid records" in caplog.text and ":2:" in caplog.text


# ----------------------------------------------------------------------------- preferences

HH_CHOSEN = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken cross the road?"
HH_REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant: No."
HH_PROMPT = [user("Hi there"), assistant("Hello! How can I help?"), user("Tell me a joke")]


def test_preference_formats_normalise():
    base = {"rating": None, "is_safety": False}
    explicit = {"prompt": "Q?", "chosen": "Good.", "rejected": "Bad.", "rating": "Slightly Better"}
    assert normalize_preference(explicit) == {
        "prompt": [user("Q?")],
        "chosen": "Good.",
        "rejected": "Bad.",
        "rating": "slightly_better",
        "is_safety": False,
    }
    hh = normalize_preference({"chosen": HH_CHOSEN, "rejected": HH_REJECTED})
    assert hh == {
        "prompt": HH_PROMPT,
        "chosen": "Why did the chicken cross the road?",
        "rejected": "No.",
        **base,
    }
    conversations = {
        "prompt": HH_PROMPT,
        "chosen": [*HH_PROMPT, assistant("Why did the chicken cross the road?")],
        "rejected": [assistant("No.")],
        "safety": True,
        "rating": "unsure",
    }
    assert normalize_preference(conversations) == {
        **hh,
        "is_safety": True,
        "rating": "negligibly_better",
    }
    lists_only = {"chosen": conversations["chosen"], "rejected": [*HH_PROMPT, assistant("No.")]}
    assert normalize_preference(lists_only) == hh
    hh_prompt = {
        "prompt": "\n\nHuman: Hi\n\nAssistant:",
        "chosen": " Hello.",
        "rejected": " Go away.",
    }
    assert normalize_preference(hh_prompt)["prompt"] == [user("Hi")]


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ({"prompt": "q", "chosen": "a"}, "rejected", "missing"),
        ({"prompt": "q", "rejected": "a"}, "chosen", "missing"),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "rejected", "identical"),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "rating": "much better"},
            "rating",
            "unknown preference rating",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "rating": 2},
            "rating",
            "expected a rating",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "is_safety": "yes"},
            "is_safety",
            "expected true/false",
        ),
        (
            {"prompt": [user("q"), assistant("a")], "chosen": "a", "rejected": "b"},
            "prompt",
            "must end with a 'user'",
        ),
        (
            {"prompt": [user("q")], "chosen": [user("x"), assistant("a")], "rejected": "b"},
            "chosen",
            "differs from 'prompt'",
        ),
        (
            {"chosen": HH_CHOSEN, "rejected": "\n\nHuman: other\n\nAssistant: No."},
            "rejected",
            "differs from 'chosen'",
        ),
        (
            {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: x"},
            "chosen",
            "no '\\n\\nAssistant:'",
        ),
        (
            {
                "chosen": "\n\nHuman: hi\n\nAssistant:  ",
                "rejected": "\n\nHuman: hi\n\nAssistant: x",
            },
            "chosen",
            "empty",
        ),
        (
            {
                "chosen": "Intro\n\nHuman: hi\n\nAssistant: a",
                "rejected": "\n\nHuman: hi\n\nAssistant: x",
            },
            "chosen",
            "before the first 'Human:'",
        ),
        ({"chosen": 3, "rejected": "b"}, "chosen", "expected a string"),
    ],
)
def test_preference_errors(tmp_path: Path, row: dict, field: str, message: str):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "p.jsonl", [good, good, row])
    err = _error(path, load_preference_records)
    assert (err.path, err.line, err.field) == (str(path), 3, field)
    assert message in err.message


def test_preference_files_round_trip(tmp_path: Path):
    rows = [
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        {
            "prompt": "Q?",
            "chosen": "Good.",
            "rejected": "Bad.",
            "rating": "better",
            "is_safety": True,
        },
    ]
    expected = [normalize_preference(r) for r in rows]
    assert load_preference_records(write_jsonl(tmp_path / "p.jsonl", rows)) == expected
    assert load_preference_records(write_parquet(tmp_path / "p.parquet", rows)) == expected


# ---------------------------------------------------------------------------------- prompts


def test_prompt_formats(tmp_path: Path):
    rows = [
        {"prompt": "Hello?", "is_safety": True},
        {"prompt": [system("s"), user("q")]},
        {"messages": [user("q"), assistant("a")]},  # an SFT file reused: the answer is dropped
        {"instruction": "Add.", "input": "1 2"},
    ]
    expected = [
        {"prompt": [user("Hello?")], "is_safety": True},
        {"prompt": [system("s"), user("q")], "is_safety": False},
        {"prompt": [user("q")], "is_safety": False},
        {"prompt": [user("Add.\n\n1 2")], "is_safety": False},
    ]
    assert [normalize_prompt(r) for r in rows] == expected
    assert load_prompt_records(write_jsonl(tmp_path / "p.jsonl", rows)) == expected
    parquet = write_parquet(tmp_path / "p.parquet", [rows[0], *rows[2:]])  # one type per column
    assert load_prompt_records(parquet) == [expected[0], *expected[2:]]
    err = _error(write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}]), load_prompt_records)
    assert err.line == 1 and "unrecognised prompt record" in err.message


# ------------------------------------------------------------------------------- built-in


def test_builtin_records_pass_validation():
    from llamalab.data import builtin

    for row in builtin.builtin_sft(0, n=200) + builtin.builtin_gatt(0, n=20):
        assert normalize_sft(dict(row)) == dict(row)
    for kind in ("helpful", "safety"):
        for split in ("train", "validation"):
            for row in builtin.builtin_preferences(kind, split, 0, n=200):
                assert normalize_preference(dict(row)) == dict(row)
    for row in builtin.builtin_prompts("train", 0, n=100):
        assert normalize_prompt(dict(row)) == {
            "prompt": row["prompt"],
            "is_safety": row["is_safety"],
        }


def test_iter_rows_reports_lines(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"a": 1}\n\n{"b": 2}\n')
    assert list(iter_rows(path)) == [(str(path), 2, {"a": 1}), (str(path), 4, {"b": 2})]

"""Property: a corrupted data file either loads or raises DataError naming the file, never
another exception (a user must get `path:line: field: message`, not a traceback)."""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers.data import assistant, system, user, write_parquet
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llamalab.data.errors import DataError
from llamalab.data.formats import load_preference_records, load_prompt_records, load_sft_records

HH = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: A joke?\n\nAssistant: "
ROWS: dict[str, tuple[Callable[..., Any], list[dict[str, Any]]]] = {
    "sft_messages": (
        load_sft_records,
        [
            {"messages": [system("Be brief."), user("Hi"), assistant("Hello!")]},
            {"messages": [user("a"), assistant("b"), user("c"), assistant("d")]},
        ],
    ),
    "sft_pairs": (
        load_sft_records,
        [
            {"prompt": "What is 2+2?", "response": "4"},
            {"instruction": "Translate.", "input": "cat", "output": "chat"},
        ],
    ),
    "preference_explicit": (
        load_preference_records,
        [
            {
                "prompt": "Q?",
                "chosen": "Good.",
                "rejected": "Bad.",
                "rating": "better",
                "is_safety": True,
            },
            {"prompt": [user("q")], "chosen": [user("q"), assistant("a")], "rejected": "b"},
        ],
    ),
    "preference_hh": (
        load_preference_records,
        [
            {"chosen": HH + "Why not.", "rejected": HH + "No."},
            {"chosen": HH + "A.", "rejected": HH + "B."},
        ],
    ),
    "prompts": (
        load_prompt_records,
        [{"prompt": "Hello?", "is_safety": False}, {"prompt": [system("s"), user("q")]}],
    ),
}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=4,
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path inside a JSON value."""
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else []
    )
    out = []
    for key, child in items:
        out.append((*prefix, key))
        out += _paths(child, (*prefix, key))
    return out


def _mutate(rows: list[dict], row: int, path_index: int, action: str, new_value: Any) -> list[dict]:
    rows = copy.deepcopy(rows)
    paths = _paths(rows[row])
    *parents, last = paths[path_index % len(paths)]
    container: Any = rows[row]
    for key in parents:
        container = container[key]
    if action == "drop":
        del container[last]
    else:
        container[last] = new_value
    return rows


@st.composite
def corrupted_files(
    draw: st.DrawFn,
) -> tuple[str, str, list[dict], Callable[[bytes], bytes] | None]:
    name = draw(st.sampled_from(sorted(ROWS)))
    suffix = draw(st.sampled_from([".jsonl", ".json", ".parquet"]))
    rows = ROWS[name][1]
    corruption = draw(
        st.sampled_from(["drop_field", "change_type", "truncate", "garbage", "empty"])
    )
    if corruption in ("drop_field", "change_type"):
        action = "drop" if corruption == "drop_field" else "set"
        rows = _mutate(
            rows, draw(st.integers(0, 1)), draw(st.integers(0, 50)), action, draw(JSON_VALUES)
        )
        return name, suffix, rows, None
    if corruption == "empty":
        return name, suffix, rows, lambda data: b""
    offset = draw(st.floats(0, 1))
    if corruption == "truncate":
        return name, suffix, rows, lambda data: data[: int(len(data) * offset)]
    garbage = draw(st.binary(min_size=1, max_size=8))
    return (
        name,
        suffix,
        rows,
        lambda data: data[: int(len(data) * offset)] + garbage + data[int(len(data) * offset) :],
    )


def _write(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".parquet":
        import pyarrow as pa

        try:
            write_parquet(path, rows)
        except (pa.ArrowException, TypeError, ValueError):
            assume(False)  # a column Parquet cannot hold (mixed types): nothing to read back
    elif path.suffix == ".json":  # the JSON-array form
        path.write_text(json.dumps(rows, indent=1))
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(corrupted_files())
def test_corruption_loads_or_raises_data_error_naming_the_file(case):
    name, suffix, rows, corrupt_bytes = case
    loader = ROWS[name][0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        _write(path, rows)
        if corrupt_bytes is not None:
            path.write_bytes(corrupt_bytes(path.read_bytes()))
        try:
            records = loader(path)
        except DataError as err:
            assert err.path == str(path) and str(err).startswith(str(path))
        else:
            assert records and all(isinstance(r, dict) for r in records)


@pytest.mark.parametrize("corruption", ["drop_state", "truncate_arrow", "empty_arrow"])
def test_corrupt_saved_dataset_raises_data_error(tmp_path: Path, corruption: str):
    import datasets  # a core dependency: imported here, never skipped

    datasets.Dataset.from_list(ROWS["sft_pairs"][1]).save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    if corruption == "drop_state":
        (tmp_path / "saved" / "dataset_info.json").unlink()
    elif corruption == "truncate_arrow":
        arrow.write_bytes(arrow.read_bytes()[:100])
    else:
        arrow.write_bytes(b"")
    with pytest.raises(DataError) as info:
        load_sft_records(tmp_path / "saved")
    assert str(tmp_path / "saved") in str(info.value)

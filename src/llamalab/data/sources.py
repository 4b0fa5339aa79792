"""Where users' SFT, preference and prompt data comes from: files and datasets -> raw rows.

Sources (DESIGN.md "Built-in data"): JSON lines (`.jsonl`, or `.json` holding JSON lines, one
JSON array or one object), `.parquet`, a directory of such files, a `datasets` directory written by
`save_to_disk`, or `hf:NAME[:SPLIT]` for anything `datasets.load_dataset` reads (a local
directory here, the hub elsewhere). Every problem is a `DataError` naming the file and the 1-based
line (row for Parquet / `datasets`), raised before any model is built. What a row must hold is
:mod:`llamalab.data.formats`' business.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamalab.data.errors import DataError, type_name

Row = dict[str, Any]

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
HF_PREFIX = "hf:"


def iter_rows(source: str | Path) -> Iterator[tuple[str, int, Row]]:
    """Yield `(path, line, row)` for every raw record of a source (see the module docstring).

    `line` is 1-based: the line of a JSON-lines file, the line where an array item starts, or
    the row of a Parquet file / `datasets` split. Unreadable input raises `DataError`.
    """
    text = str(source)
    if text.startswith(HF_PREFIX):
        yield from _rows_hf(text)
        return
    path = Path(source)
    if path.is_dir():
        if _is_saved_dataset(path):
            yield from _rows_dataset(_load_saved(path, None, text), text)
            return
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix in FILE_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise DataError(f"no {'/'.join(FILE_SUFFIXES)} files in this directory", path=text)
        for file in files:
            yield from _rows_file(file)
        return
    if not path.exists():
        raise DataError("no such file or directory", path=text)
    yield from _rows_file(path)


def _rows_file(path: Path) -> Iterator[tuple[str, int, Row]]:
    if path.suffix == ".parquet":
        yield from _rows_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        yield from _rows_json(path)
    else:
        raise DataError(f"unsupported file type; expected one of {FILE_SUFFIXES}", path=str(path))


def _rows_json(path: Path) -> Iterator[tuple[str, int, Row]]:
    """JSON lines; a `.json` file whose first character is `[` is read as one JSON array."""
    name = str(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read: {err.strerror or err}", path=name) from None
    if path.suffix == ".json" and data.lstrip()[:1] == b"[":
        yield from _rows_json_array(name, _decode(data, name, 1))
        return
    if path.suffix == ".json" and data.lstrip()[:1] == b"{":  # maybe one pretty-printed object
        single = _single_object(data)
        if single is not None:
            yield name, 1, single
            return
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = _decode(raw, name, number).strip()
        if line:
            yield name, number, _as_object(_parse_json(line, name, number), name, number)


def _single_object(data: bytes) -> Row | None:
    """The object of a `.json` file holding exactly one (else None: read it as JSON lines)."""
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _decode(raw: bytes, path: str, line: int) -> str:
    try:
        return raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"not valid UTF-8 (byte {err.start + 1})", path=path, line=line) from None


def _parse_json(text: str, path: str, line: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"malformed JSON: {err.msg} (column {err.colno})", path, line) from None
    except RecursionError:
        raise DataError("malformed JSON: nested too deeply", path, line) from None


def _as_object(value: Any, path: str, line: int) -> Row:
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, got {type_name(value)}", path, line)
    return value


def _rows_json_array(path: str, text: str) -> Iterator[tuple[str, int, Row]]:
    """Items of one JSON array (Alpaca's own `alpaca_data.json` is one), each with the line
    where it starts, so errors still point at the right place."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1, 0

    def where(position: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, position)
        counted = position
        return line

    pos = _skip_space(text, pos)
    if text.startswith("]", pos):
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"malformed JSON: {err.msg}", path, where(err.pos)) from None
        except RecursionError:
            raise DataError("malformed JSON: nested too deeply", path, where(pos)) from None
        yield path, where(pos), _as_object(value, path, where(pos))
        pos = _skip_space(text, end)
        if text.startswith("]", pos) and not text[pos + 1 :].strip():
            return
        if not text.startswith(",", pos):
            raise DataError("malformed JSON array: expected ',' or a final ']'", path, where(pos))
        pos = _skip_space(text, pos + 1)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _rows_parquet(path: Path) -> Iterator[tuple[str, int, Row]]:
    # lazy: pyarrow is heavy (~0.3 s), only Parquet files need it
    import pyarrow as pa
    import pyarrow.parquet as pq  # lazy: as above

    name = str(path)
    number = 0
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield name, number, row
    except (pa.ArrowException, OSError, ValueError, EOFError, MemoryError) as err:
        where = number + 1 if number else None
        raise DataError(f"unreadable Parquet file: {err}", path=name, line=where) from None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _rows_hf(spec: str) -> Iterator[tuple[str, int, Row]]:
    """`hf:NAME[:SPLIT]`: a saved dataset directory, or anything `load_dataset` understands."""
    name, split = spec[len(HF_PREFIX) :], None
    head, sep, tail = name.rpartition(":")
    if sep and head and "/" not in tail:
        name, split = head, tail
    if not name:
        raise DataError("expected hf:NAME[:SPLIT]", path=spec)
    if Path(name).is_dir() and _is_saved_dataset(Path(name)):
        yield from _rows_dataset(_load_saved(Path(name), split, spec), spec)
        return
    import datasets  # lazy: heavy (~1 s), only hf:NAME sources need it

    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # the library's own errors vary: report, never crash
        raise DataError(f"datasets.load_dataset failed: {err}", path=spec) from None
    yield from _rows_dataset(dataset, spec)


def _load_saved(path: Path, split: str | None, spec: str) -> Any:
    import datasets  # lazy: heavy (~1 s), only saved `datasets` directories need it

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # corrupt or foreign directory
        raise DataError(f"datasets.load_from_disk failed: {err}", path=spec) from None
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if split is None:
        split = "train" if "train" in loaded or len(loaded) != 1 else next(iter(loaded))
    if split not in loaded:
        raise DataError(f"no split {split!r}; the dataset has {sorted(loaded)}", path=spec)
    return loaded[split]


def _rows_dataset(dataset: Any, spec: str) -> Iterator[tuple[str, int, Row]]:
    import pyarrow as pa  # lazy: heavy (~0.3 s); a `datasets` source, which loaded it already

    number = 0
    try:
        for number, row in enumerate(dataset, start=1):
            yield spec, number, _as_object(row, spec, number)
    except (pa.ArrowException, OSError, ValueError, EOFError, MemoryError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"unreadable dataset: {err}", path=spec, line=number + 1) from None

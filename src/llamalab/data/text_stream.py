"""Pretraining text read as a stream of pieces: never a whole corpus in memory.

A source (``data.path`` of ``src/prepare.py``) is split into :class:`Piece` s, units of work a
preparation worker reads on its own, in order:

- ``.txt``: the whole file (documents are blocks of non-empty lines separated by blank lines,
  as in :mod:`llamalab.data.corpus`), read line by line;
- ``.jsonl``: byte ranges of about ``piece_bytes`` cut at line ends (each knows its first line
  number, so errors name the file's real line), one JSON object per line, field ``text``;
- ``.parquet``: row groups, column ``text``, read batch by batch;
- a directory written by ``datasets.Dataset.save_to_disk``: row ranges of the memory-mapped
  Arrow table;
- ``hf:NAME``: ``datasets.load_dataset(NAME, split="train", streaming=True)``, one piece;
- a directory: every file above below it, in sorted path order.

Every piece yields ``(source, line, text)``: ``source`` names where the document came from
(the file relative to ``data.path``, or the ``hf:`` name), ``line`` the 1-based line or row.
Empty documents are skipped. A malformed record raises :class:`DataError` naming file, line and
field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llamalab.data.errors import DataError

PIECE_BYTES = 64 * 2**20  # a .jsonl piece: about 64 MiB of text
SAVED_ROWS = 100_000  # rows of a saved `datasets` directory per piece
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Piece:
    """One unit of reading: ``kind`` (txt/jsonl/parquet/saved/hf), the file or name, a range
    (bytes for jsonl, row groups for parquet, rows for saved; ``stop`` -1 = to the end) and the
    1-based number of its first line/row."""

    source: str
    path: str
    kind: str
    start: int = 0
    stop: int = -1
    first_line: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def text_files(root: Path) -> list[Path]:
    """``root`` itself, or every text file below it in sorted path order; an unsupported file or
    a directory with none raises DataError."""
    if root.is_file():
        if root.suffix not in TEXT_SUFFIXES:
            raise DataError(
                f"unsupported file type {root.suffix!r} (use {TEXT_SUFFIXES})", path=str(root)
            )
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise DataError(f"directory holds no {'/'.join(TEXT_SUFFIXES)} file", path=str(root))
    return files


def plan_pieces(path: str | os.PathLike[str], piece_bytes: int = PIECE_BYTES) -> list[Piece]:
    """The pieces of a source, cheaply (file sizes, line ends and Parquet metadata only).

    Raises DataError for a missing path, an unsupported file or a directory with no text file.
    """
    if isinstance(path, str) and path.startswith("hf:"):
        return [Piece(path, path[3:], "hf")]
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError("no such file or directory", path=str(root))
    if root.is_dir() and is_saved_dataset(root):
        return _saved_pieces(root)
    pieces: list[Piece] = []
    for file in text_files(root):
        source = file.name if file == root else file.relative_to(root).as_posix()
        if file.suffix == ".txt":
            pieces.append(Piece(source, str(file), "txt"))
        elif file.suffix == ".jsonl":
            pieces.extend(_jsonl_pieces(file, source, piece_bytes))
        else:
            pieces.extend(_parquet_pieces(file, source))
    return pieces


def _jsonl_pieces(file: Path, source: str, piece_bytes: int) -> list[Piece]:
    """Byte ranges of about ``piece_bytes`` ending at line ends, with their first line numbers."""
    size, pieces, start, line = file.stat().st_size, [], 0, 1
    with file.open("rb") as handle:
        while start < size:
            handle.seek(min(start + piece_bytes, size))
            handle.readline()  # to the end of the line the cut falls in
            stop = min(handle.tell(), size)
            pieces.append(Piece(source, str(file), "jsonl", start, stop, line))
            handle.seek(start)
            remaining = stop - start
            while remaining:
                block = handle.read(min(_BLOCK, remaining))
                line += block.count(b"\n")
                remaining -= len(block)
            start = stop
    return pieces or [Piece(source, str(file), "jsonl", 0, 0, 1)]


def _parquet_pieces(file: Path, source: str) -> list[Piece]:
    import pyarrow as pa  # lazy: heavy (~0.3 s), only Parquet files need it
    import pyarrow.parquet as pq  # lazy: heavy (~0.3 s), only Parquet files need it

    try:
        meta = pq.ParquetFile(file).metadata
        names = pq.read_schema(file).names
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"cannot read as parquet: {err}", str(file)) from err
    if "text" not in names:
        raise DataError(f"missing column (columns: {names})", str(file), None, "text")
    pieces, row = [], 1
    for group in range(meta.num_row_groups):
        pieces.append(Piece(source, str(file), "parquet", group, group + 1, row))
        row += meta.row_group(group).num_rows
    return pieces


def is_saved_dataset(root: Path) -> bool:
    """A directory written by ``datasets.Dataset(Dict).save_to_disk``."""
    return (root / "dataset_info.json").is_file() or (root / "dataset_dict.json").is_file()


def _load_saved(path: str) -> Any:
    import datasets  # lazy: heavy (~1 s), only `datasets` directories need it

    loaded = datasets.load_from_disk(path)  # memory-mapped Arrow: nothing is read yet
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"no 'train' split (splits: {list(loaded)})", path=path)
        loaded = loaded["train"]
    if "text" not in loaded.column_names:
        raise DataError(f"missing column (columns: {loaded.column_names})", path, None, "text")
    return loaded


def _saved_pieces(root: Path) -> list[Piece]:
    n = len(_load_saved(str(root)))
    return [
        Piece(root.name, str(root), "saved", a, min(a + SAVED_ROWS, n), a + 1)
        for a in range(0, max(n, 1), SAVED_ROWS)
    ]


# ---------------------------------------------------------------------- reading
def read_piece(piece: Piece) -> Iterator[tuple[str, int, str]]:
    """``(source, line, text)`` of every non-empty document of ``piece``, in order."""
    readers = {
        "txt": _txt,
        "jsonl": _jsonl,
        "clean": _jsonl,
        "parquet": _parquet,
        "saved": _saved,
        "hf": _hf,
    }
    yield from readers[piece.kind](piece)


def count_documents(pieces: list[Piece]) -> int:
    """Read every record now (no tokenization): a malformed one stops here, named."""
    return sum(1 for piece in pieces for _ in read_piece(piece))


def _txt(piece: Piece) -> Iterator[tuple[str, int, str]]:
    block: list[str] = []
    first = 0
    with open(piece.path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise DataError(f"not valid UTF-8 ({err.reason})", piece.path, line_no) from err
            if line.strip():
                first = first or line_no
                block.append(line)
            elif block:
                yield piece.source, first, "\n".join(block)
                block, first = [], 0
    if block:
        yield piece.source, first, "\n".join(block)


def _jsonl(piece: Piece) -> Iterator[tuple[str, int, str]]:
    with open(piece.path, "rb") as handle:
        handle.seek(piece.start)
        line_no, position = piece.first_line - 1, piece.start
        while position < piece.stop:
            raw = handle.readline()
            if not raw:
                break
            position += len(raw)
            line_no += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"not valid UTF-8 ({err.reason})", piece.path, line_no) from err
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"invalid JSON: {err.msg}", piece.path, line_no) from err
            text = _text_field(record, piece.path, line_no)
            if text.strip():
                # cleaned files (kind "clean") carry each document's original source
                meta = record.get("metadata") if piece.kind == "clean" else None
                source = meta.get("source") if isinstance(meta, dict) else None
                yield (source if isinstance(source, str) else piece.source), line_no, text


def _text_field(record: Any, path: str, line: int) -> str:
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", path, line)
    if "text" not in record:
        raise DataError(f"missing (keys: {sorted(record)})", path, line, "text")
    text = record["text"]
    if not isinstance(text, str):
        raise DataError(f"expected a string, got {type(text).__name__}", path, line, "text")
    return text


def _checked(source: str, path: str, row: int, value: Any) -> Iterator[tuple[str, int, str]]:
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", path, row, "text")
    if value.strip():
        yield source, row, value


def _parquet(piece: Piece) -> Iterator[tuple[str, int, str]]:
    import pyarrow as pa  # lazy: heavy (~0.3 s), only Parquet files need it
    import pyarrow.parquet as pq  # lazy: heavy (~0.3 s), only Parquet files need it

    row = piece.first_line
    try:
        parquet = pq.ParquetFile(piece.path)
        groups = list(range(piece.start, piece.stop))
        for batch in parquet.iter_batches(batch_size=1024, row_groups=groups, columns=["text"]):
            for value in batch.column(0).to_pylist():
                yield from _checked(piece.source, piece.path, row, value)
                row += 1
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"cannot read as parquet: {err}", piece.path) from err


def _saved(piece: Piece) -> Iterator[tuple[str, int, str]]:
    dataset = _load_saved(piece.path)
    for first in range(piece.start, piece.stop, 1024):
        values = dataset[first : min(first + 1024, piece.stop)]["text"]
        for offset, value in enumerate(values):
            yield from _checked(piece.source, piece.path, first + offset + 1, value)


def _hf(piece: Piece) -> Iterator[tuple[str, int, str]]:
    import datasets  # lazy: heavy (~1 s), only hf:NAME sources need it

    try:
        stream = datasets.load_dataset(piece.path, split="train", streaming=True)
    except Exception as err:  # datasets raises many types: say which source failed
        raise DataError(f"datasets.load_dataset failed: {err}", path=piece.source) from err
    for row, record in enumerate(stream, start=1):
        if "text" not in record:
            raise DataError(f"missing (keys: {sorted(record)})", piece.source, row, "text")
        yield from _checked(piece.source, piece.source, row, record["text"])

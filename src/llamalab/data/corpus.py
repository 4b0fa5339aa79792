"""Where pretraining text comes from: the built-in corpus, the user's files, and their fingerprints.

The built-in corpus is the standard library's own documentation (DESIGN.md, "Built-in data"),
so the whole pipeline runs with no download. The built-in tokenizer is trained on it once and
cached under a name that records everything it depends on.

User text formats (one job: turn a path into a list of documents):

- ``.txt``: documents are blocks of non-empty lines separated by one or more blank lines
  (a blank line holds only whitespace). Lines inside a block keep their newlines.
- ``.jsonl``: one JSON object per non-empty line, the document in the string field ``text``.
- ``.parquet``: the string column ``text``.
- a directory: every ``.txt``/``.jsonl``/``.parquet`` file below it, in sorted path order; a
  directory written by ``datasets.Dataset.save_to_disk`` is read with ``datasets.load_from_disk``.
- ``hf:NAME``: ``datasets.load_dataset(NAME, split="train")``, column ``text`` (a hub name, or a
  local dataset directory/script on machines without a network).

Empty documents (only whitespace) are skipped: they would add nothing but BOS and EOS.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from llamalab.data.errors import DataError
from llamalab.data.stdlib_docs import all_documents, python_key
from llamalab.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
BUILTIN_CORPUS_VERSION = 1  # bump when what the built-in corpus contains changes
# Bump when Tokenizer.train's settings change: cached built-in tokenizers carry it in their name.
BUILTIN_TOKENIZER_VERSION = 1


def default_cache_dir() -> Path:
    """``$LLAMALAB_CACHE`` if set, else ``~/.cache/llamalab``."""
    env = os.environ.get("LLAMALAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llamalab"


def builtin_corpus() -> list[str]:
    """The built-in pretraining corpus: pydoc topics then stdlib docstrings, sorted by name."""
    return all_documents()


def builtin_corpus_key() -> str:
    """Names the built-in corpus's content: the docs differ between Python versions."""
    return f"stdlib-docs-v{BUILTIN_CORPUS_VERSION}-{python_key()}"


def builtin_tokenizer_path(
    vocab_size: int, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Where the built-in tokenizer of ``vocab_size`` pieces is cached."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = f"{builtin_corpus_key()}-spm{BUILTIN_TOKENIZER_VERSION}-v{vocab_size}.model"
    return root / "tokenizers" / name


def load_builtin_tokenizer(
    vocab_size: int, cache_dir: str | os.PathLike[str] | None = None
) -> Tokenizer:
    """The built-in tokenizer, trained on :func:`builtin_corpus` the first time (under a second).

    Training is deterministic and written atomically, so two processes that race here write the
    same bytes and a reader never sees a torn file. SentencePiece caps ``vocab_size`` on this
    corpus at about 31,000 pieces; a larger value raises ValueError saying the limit.
    """
    path = builtin_tokenizer_path(vocab_size, cache_dir)
    if path.is_file():
        return Tokenizer(path)
    return Tokenizer.train(builtin_corpus(), path, vocab_size)


# ---------------------------------------------------------------------- user files
def read_text_documents(path: str | os.PathLike[str]) -> list[str]:
    """Documents of a user's pretraining text (formats in the module docstring).

    Raises:
        DataError: missing path, unsupported file type, a malformed record (naming the file,
            line and field), or no document at all.
    """
    if isinstance(path, str) and path.startswith("hf:"):
        documents = _documents_from_dataset(_load_hf_dataset(path[3:]), path)
    else:
        root = Path(path).expanduser()
        if not root.exists():
            raise DataError("no such file or directory", path=str(root))
        if root.is_dir() and _is_saved_dataset(root):
            documents = _documents_from_dataset(_load_saved_dataset(root), str(root))
        else:
            documents = [doc for file in _text_files(root) for doc in _read_file(file)]
    if not documents:
        raise DataError("no non-empty document found", path=str(path))
    return documents


def source_fingerprint(path: str | os.PathLike[str]) -> str | None:
    """sha256 of the source files' relative paths, sizes and mtimes, or None when the source
    is not plain files (``hf:`` names, saved datasets): then fingerprint the documents."""
    if isinstance(path, str) and path.startswith("hf:"):
        return None
    root = Path(path).expanduser()
    if not root.exists() or (root.is_dir() and _is_saved_dataset(root)):
        return None
    digest = hashlib.sha256()
    for file in _text_files(root):
        stat = file.stat()
        rel = file.relative_to(root) if root.is_dir() else Path(file.name)
        digest.update(f"{rel.as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def documents_fingerprint(documents: Iterable[str]) -> str:
    """sha256 of the documents themselves (each length-prefixed, so boundaries count)."""
    digest = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _text_files(root: Path) -> list[Path]:
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


def _read_file(file: Path) -> list[str]:
    """Documents of one file; undecodable text or a corrupt Parquet file -> DataError naming it."""
    import pyarrow as pa  # lazy: heavy (~0.3 s); here for its exception type, Parquet files

    try:
        if file.suffix == ".txt":
            return list(_txt_documents(file.read_text(encoding="utf-8")))
        if file.suffix == ".jsonl":
            return list(_jsonl_documents(file))
        return _parquet_documents(file)
    except UnicodeDecodeError as err:  # .txt: err.start is an offset into the whole file
        line = file.read_bytes()[: err.start].count(b"\n") + 1 if file.suffix == ".txt" else None
        raise DataError(f"not valid UTF-8 ({err.reason})", str(file), line) from err
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"cannot read as {file.suffix[1:]}: {err}", str(file)) from err


def _txt_documents(text: str) -> Iterator[str]:
    block: list[str] = []
    for line in text.splitlines():
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _jsonl_documents(file: Path) -> Iterator[str]:
    with file.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"not valid UTF-8 ({err.reason})", str(file), line_no) from err
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"invalid JSON: {err.msg}", str(file), line_no) from err
            text = _text_field(record, str(file), line_no)
            if text.strip():
                yield text


def _text_field(record: Any, path: str, line: int) -> str:
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", path, line)
    if "text" not in record:
        raise DataError(f"missing (keys: {sorted(record)})", path, line, "text")
    text = record["text"]
    if not isinstance(text, str):
        raise DataError(f"expected a string, got {type(text).__name__}", path, line, "text")
    return text


def _parquet_documents(file: Path) -> list[str]:
    import pyarrow.parquet as pq  # lazy: heavy (~0.3 s), only Parquet files need it

    schema = pq.read_schema(file)
    if "text" not in schema.names:
        raise DataError(f"missing column (columns: {schema.names})", str(file), None, "text")
    column = pq.read_table(file, columns=["text"]).column("text").to_pylist()
    return _checked_texts(column, str(file))


def _checked_texts(values: Iterable[Any], path: str) -> list[str]:
    texts = []
    for row, value in enumerate(values, start=1):
        if not isinstance(value, str):
            raise DataError(f"expected a string, got {type(value).__name__}", path, row, "text")
        if value.strip():
            texts.append(value)
    return texts


def _is_saved_dataset(root: Path) -> bool:
    return (root / "dataset_info.json").is_file() or (root / "dataset_dict.json").is_file()


def _load_saved_dataset(root: Path) -> Any:
    import datasets  # lazy: heavy (~1 s), only `datasets` directories need it

    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"no 'train' split (splits: {list(loaded)})", path=str(root))
        loaded = loaded["train"]
    return loaded


def _load_hf_dataset(name: str) -> Any:
    import datasets  # lazy: heavy (~1 s), only hf:NAME sources need it

    try:
        return datasets.load_dataset(name, split="train")
    except Exception as err:  # datasets raises many types: say which source failed
        raise DataError(f"datasets.load_dataset failed: {err}", path=f"hf:{name}") from err


def _documents_from_dataset(dataset: Any, path: str) -> list[str]:
    if "text" not in dataset.column_names:
        raise DataError(f"missing column (columns: {dataset.column_names})", path, None, "text")
    return _checked_texts(dataset["text"], path)

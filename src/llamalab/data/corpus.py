"""Where pretraining text comes from: the built-in corpus, the user's files, and their fingerprints.

The built-in corpus is the standard library's own documentation (DESIGN.md, "Built-in data"),
so the whole pipeline runs with no download. The built-in tokenizer is trained on it once and
cached under a name that records everything it depends on.

User text (``.txt`` / ``.jsonl`` / ``.parquet``, a directory of them, a saved dataset or
``hf:NAME``) is read by :mod:`llamalab.data.text_stream`, piece by piece; here are the whole-list
reader for small corpora and the fingerprints that key the prepared-data cache.

Empty documents (only whitespace) are skipped: they would add nothing but BOS and EOS.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from llamalab.data.errors import DataError
from llamalab.data.stdlib_docs import all_documents, python_key
from llamalab.data.text_stream import (
    is_saved_dataset,
    plan_pieces,
    read_piece,
    text_files,
)
from llamalab.tokenizer import Tokenizer

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
    """Every document of a user's pretraining text, as one list (formats:
    :mod:`llamalab.data.text_stream`, which this reads). For small corpora and inspection only:
    training never holds a corpus in memory (``src/prepare.py`` streams it into shards).

    Raises:
        DataError: missing path, unsupported file type, a malformed record (naming the file,
            line and field), or no document at all.
    """
    documents = [text for piece in plan_pieces(path) for _, _, text in read_piece(piece)]
    if not documents:
        raise DataError("no non-empty document found", path=str(path))
    return documents


def source_fingerprint(path: str | os.PathLike[str]) -> str | None:
    """sha256 of the source files' relative paths, sizes and mtimes, or None when the source
    is not plain files (``hf:`` names, saved datasets): then fingerprint the documents."""
    if isinstance(path, str) and path.startswith("hf:"):
        return None
    root = Path(path).expanduser()
    if not root.exists() or (root.is_dir() and is_saved_dataset(root)):
        return None
    digest = hashlib.sha256()
    for file in text_files(root):
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

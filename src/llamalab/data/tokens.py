"""Tokenise a corpus once into a memory-mapped token file that later runs reuse.

A cache directory holds:

- ``tokens.bin``: every document as ``[BOS] + tokens + [EOS]``, concatenated; raw little-endian
  ``uint16`` when the vocabulary fits (< 65536 pieces, LLaMA's 32000 does), else ``uint32``.
- ``offsets.bin``: ``int64 (n_docs + 1,)``, where document ``i`` is ``tokens[offsets[i]:offsets[i+1]]``.
- ``manifest.json``: what the tokens were made from (inputs fingerprint, tokenizer file sha256),
  ``dtype``, ``n_tokens``, ``n_docs``, ``version``. Written last.

A cache is used only when its manifest matches the request and the files have the sizes the
manifest says; otherwise it is rebuilt (never silently reused). A rebuild first deletes the
manifest, writes the data under temporary names, renames them into place, and writes the manifest
last, so a process killed at any point leaves either a valid cache or one without a manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from llamalab.tokenizer import Tokenizer

CACHE_VERSION = 1
TOKENS_FILE, OFFSETS_FILE, MANIFEST_FILE = "tokens.bin", "offsets.bin", "manifest.json"
ENCODE_BATCH = 256  # documents per SentencePiece call


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: uint16 below 65536 pieces, else uint32."""
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (the tokenizer model: a different model means different ids)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TokenCache:
    """A valid token cache directory; ``tokens`` and ``offsets`` are read-only memory maps."""

    cache_dir: Path
    manifest: dict[str, Any]

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def n_docs(self) -> int:
        return int(self.manifest["n_docs"])

    @property
    def tokens(self) -> np.ndarray:
        """``(n_tokens,)`` token ids, memory-mapped (pages load on access, shared by workers)."""
        dtype = np.dtype(self.manifest["dtype"])
        return np.memmap(
            self.cache_dir / TOKENS_FILE, dtype=dtype, mode="r", shape=(self.n_tokens,)
        )

    @property
    def offsets(self) -> np.ndarray:
        """``(n_docs + 1,)`` int64 start of each document in ``tokens`` (last entry = n_tokens)."""
        path = self.cache_dir / OFFSETS_FILE
        return np.memmap(path, dtype=np.int64, mode="r", shape=(self.n_docs + 1,))

    def document(self, index: int) -> np.ndarray:
        """Tokens of document ``index``, BOS and EOS included."""
        offsets = self.offsets
        return np.asarray(self.tokens[offsets[index] : offsets[index + 1]])


def expected_manifest(tokenizer: Tokenizer, fingerprint: str) -> dict[str, Any]:
    """The manifest fields a cache must match to be reused (sizes are checked separately)."""
    return {
        "version": CACHE_VERSION,
        "fingerprint": fingerprint,
        "tokenizer_sha256": file_sha256(tokenizer.model_path),
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size).name,
    }


def open_token_cache(
    cache_dir: str | os.PathLike[str], expected: dict[str, Any]
) -> TokenCache | None:
    """The cache in ``cache_dir`` if it is complete and matches ``expected``, else None."""
    cache_dir = Path(cache_dir)
    try:
        manifest = json.loads((cache_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in expected.items()):
        return None
    try:
        itemsize = np.dtype(manifest["dtype"]).itemsize
        sizes_ok = (cache_dir / TOKENS_FILE).stat().st_size == manifest["n_tokens"] * itemsize and (
            cache_dir / OFFSETS_FILE
        ).stat().st_size == (manifest["n_docs"] + 1) * 8
    except (OSError, KeyError, TypeError):
        return None
    return TokenCache(cache_dir, manifest) if sizes_ok else None


def build_token_cache(
    documents: Iterable[str] | Callable[[], Iterable[str]],
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike[str],
    fingerprint: str,
) -> TokenCache:
    """Reuse the cache in ``cache_dir`` if it matches, else tokenise ``documents`` into it.

    Args:
        documents: the texts, or a function returning them (called only when a rebuild is
            needed, so a valid cache skips reading the corpus).
        tokenizer: gives the ids; its model file's sha256 goes into the manifest.
        cache_dir: the directory (created if needed).
        fingerprint: names the inputs (e.g. a sha256 of the documents or of the source files).
    """
    cache_dir = Path(cache_dir)
    expected = expected_manifest(tokenizer, fingerprint)
    cache = open_token_cache(cache_dir, expected)
    if cache is not None:
        return cache
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / MANIFEST_FILE).unlink(missing_ok=True)  # from here on the old cache is invalid
    texts = documents() if callable(documents) else documents
    n_tokens, n_docs = _write_tokens(texts, tokenizer, cache_dir, np.dtype(expected["dtype"]))
    manifest = {**expected, "n_tokens": n_tokens, "n_docs": n_docs}
    tmp = cache_dir / f"{MANIFEST_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, cache_dir / MANIFEST_FILE)
    return TokenCache(cache_dir, manifest)


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(texts)
    while batch := list(islice(iterator, size)):
        yield batch


def _write_tokens(
    texts: Iterable[str], tokenizer: Tokenizer, cache_dir: Path, dtype: np.dtype
) -> tuple[int, int]:
    """Stream ``[BOS] + ids + [EOS]`` per document into temp files, then rename them in place."""
    suffix = f".tmp-{os.getpid()}"
    tokens_tmp, offsets_tmp = (
        cache_dir / (TOKENS_FILE + suffix),
        cache_dir / (OFFSETS_FILE + suffix),
    )
    n_tokens, n_docs = 0, 0
    try:
        with tokens_tmp.open("wb") as tok_out, offsets_tmp.open("wb") as off_out:
            np.zeros(1, dtype=np.int64).tofile(off_out)
            for batch in _batches(texts, ENCODE_BATCH):
                encoded = tokenizer.encode_batch(batch, bos=True, eos=True)
                lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64)
                flat = np.fromiter((i for ids in encoded for i in ids), dtype=dtype)
                flat.tofile(tok_out)
                (n_tokens + np.cumsum(lengths)).tofile(off_out)
                n_tokens += int(lengths.sum())
                n_docs += len(encoded)
        os.replace(tokens_tmp, cache_dir / TOKENS_FILE)
        os.replace(offsets_tmp, cache_dir / OFFSETS_FILE)
    finally:
        tokens_tmp.unlink(missing_ok=True)
        offsets_tmp.unlink(missing_ok=True)
    return n_tokens, n_docs

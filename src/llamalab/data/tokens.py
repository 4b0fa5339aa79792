"""The sha256 of a tokenizer file: what prepared shards (``manifest.json``), cached
GAtt data and training runs compare to know they speak the same tokenizer."""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (the tokenizer model: a different model means different ids)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

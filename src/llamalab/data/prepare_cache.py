"""The built-in corpus and ``data.path`` of a training run, prepared into the cache by the same
code as ``src/prepare.py`` (one worker, quietly), so every pretraining run reads shards."""

from __future__ import annotations

import json
import os
from pathlib import Path

from llamalab.data.corpus import builtin_corpus, builtin_corpus_key
from llamalab.data.prepare import PrepareSettings, prepare_corpus
from llamalab.data.tokens import file_sha256
from llamalab.tokenizer import Tokenizer

BUILTIN_CHUNK_TOKENS = 2**20  # the built-in corpus is about a million tokens


def builtin_corpus_file(cache_root: Path) -> Path:
    """The built-in corpus as JSON lines in the cache (written once, atomically)."""
    path = cache_root / "data" / f"{builtin_corpus_key()}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            for text in builtin_corpus():
                handle.write(json.dumps({"text": text}) + "\n")
        os.replace(tmp, path)
    return path


def prepare_in_cache(
    path: str | None, out: Path, tokenizer: Tokenizer, val_fraction: float
) -> None:
    """Prepare ``path`` (None: the built-in corpus) into ``out`` unless already there."""
    source = str(builtin_corpus_file(out.parent.parent)) if path is None else path
    settings = PrepareSettings(
        source=source,
        tokenizer_sha256=file_sha256(tokenizer.model_path),
        val_fraction=val_fraction,
        chunk_tokens=BUILTIN_CHUNK_TOKENS,
    )
    prepare_corpus(settings, out, tokenizer, workers=1, verbose=False)

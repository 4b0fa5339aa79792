"""Shared by the data tests: a small tokenizer trained once per session (also the ``small_tok``
fixture of conftest.py), and file writers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llamalab.tokenizer import Tokenizer

_TOKENIZERS: dict[str, Tokenizer] = {}

_EXTRA_LINES = [
    "You are a helpful assistant. Answer briefly and politely.",
    "What is the capital of France? Paris is the capital of France.",
    "Write a haiku about the sea. Waves fold into foam.",
    "Human: how do I sort a list in Python? Assistant: use sorted() or list.sort().",
    "Summarise the text below in one sentence, please.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
]


def small_tokenizer(tmp_path_factory: Any) -> Tokenizer:
    """A 512-piece LLaMA-style tokenizer trained on a few hundred lines (once per session)."""
    if "small" not in _TOKENIZERS:
        from llamalab.data.builtin import builtin_sft

        texts = [m["content"] for r in builtin_sft(0, n=150) for m in r["messages"]]
        texts += _EXTRA_LINES * 5
        path = tmp_path_factory.mktemp("tokenizer") / "small.model"
        _TOKENIZERS["small"] = Tokenizer.train(texts, path, vocab_size=512)
    return _TOKENIZERS["small"]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = list(dict.fromkeys(key for row in rows for key in row))  # union, first-seen order
    pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in rows]), path)
    return path


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}

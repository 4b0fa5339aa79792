"""Preparing a corpus streams it: peak memory does not grow with the corpus.

`src/prepare.py` (2 workers) runs on a generated corpus of ``LLAMALAB_RSS_CORPUS_MB`` (default
256) MB and on one of 4 MB, each in a fresh process under ``helpers/peak_rss.py``. The bound:
the large corpus's peak resident set (largest process: the main one or a worker) exceeds the
small one's by less than 1/8 of the large corpus's size (32 MB at 256 MB), with 2^20-token
chunks (module constant). Measured: 256 MB -> 32 s on 2 cores; kept in `make test-experiments`
with the other runs that take minutes on a loaded machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import REPO, run_train

from llamalab.tokenizer import Tokenizer

PREPARE = REPO / "src" / "prepare.py"
PEAK_RSS = REPO / "tests" / "helpers" / "peak_rss.py"
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.experiment]
# A worker holds one chunk in memory while it fills it: 2^20 tokens (2 MiB as uint16) here, so
# that buffer, a constant, does not hide what would grow with the corpus (the default 2^24-token
# chunk adds 32 MiB, whatever the corpus size, once the corpus fills a chunk).
CHUNK_TOKENS = 2**20


def _corpus(root: Path, megabytes: float) -> int:
    """About ``megabytes`` of distinct JSON-lines documents in 4 files; returns the bytes."""
    root.mkdir(parents=True)
    target, written, i = int(megabytes * 2**20), 0, 0
    handles = [(root / f"part{k}.jsonl").open("w") for k in range(4)]
    while written < target:
        words = " ".join(f"w{(i * j + j) % 1009}" for j in range(150))
        line = json.dumps({"text": f"document {i}: {words}"}) + "\n"
        handles[i % 4].write(line)
        written += len(line)
        i += 1
    for handle in handles:
        handle.close()
    return written


def _peak(tmp_path: Path, name: str, megabytes: float, cache_dir: Path, tok: Tokenizer):
    size = _corpus(tmp_path / f"{name}_src", megabytes)
    result = run_train(
        [
            str(PREPARE),
            f"data.path={tmp_path / f'{name}_src'}",
            f"data.name={name}",
            "data.workers=2",
            f"data.chunk_tokens={CHUNK_TOKENS}",
            f"data.tokenizer_path={tok.model_path}",
            f"paths.outputs_root={tmp_path / 'outputs'}",
        ],
        cache_dir,
        timeout=3600,
        script=PEAK_RSS,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["returncode"] == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "outputs" / "data" / name / "manifest.json").read_text())
    return size, report["peak_rss_mb"], manifest["totals"]["train"]["tokens"]


def test_peak_memory_does_not_grow_with_the_corpus(
    tmp_path: Path, cache_dir: Path, small_tok: Tokenizer
) -> None:
    megabytes = float(os.environ.get("LLAMALAB_RSS_CORPUS_MB", "256"))
    _, small_peak, _ = _peak(tmp_path, "small", 4, cache_dir, small_tok)
    size, big_peak, tokens = _peak(tmp_path, "big", megabytes, cache_dir, small_tok)
    print(
        f"corpus {size / 2**20:.0f} MB ({tokens} tokens): peak RSS {big_peak:.0f} MB; "
        f"4 MB corpus: {small_peak:.0f} MB"
    )
    assert big_peak - small_peak < size / 2**20 / 8

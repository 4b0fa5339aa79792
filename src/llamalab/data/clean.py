"""Cleaning and deduplication before tokenization, with datatrove (what built FineWeb).

``data.clean`` of ``src/prepare.py`` turns steps on (configs/prepare.yaml):

Words are split by :class:`SplitWords` (datatrove's English word tokenizer needs spaCy).

- ``min_words`` / ``max_words``: ``GopherQualityFilter`` with only its word-count bounds;
- ``repetition``: ``GopherRepetitionFilter`` (duplicated lines, paragraphs and n-grams);
- ``language: [en, ...]``: ``LanguageFilter`` (fastText's lid.176, which datatrove downloads
  once: needs a network or its cache);
- ``exact_dedup``: ``ExactDedupSignature`` -> ``ExactFindDedups`` -> ``ExactDedupFilter``
  (the text's hash; of identical documents the first one read is kept);
- ``minhash``: ``MinhashDedupSignature`` -> ``Buckets`` -> ``Cluster`` -> ``Filter`` (5-grams,
  14 buckets of 8 hashes: pairs above about 75% Jaccard similarity are near duplicates).

Each stage is a datatrove pipeline run by ``LocalPipelineExecutor`` with one task per worker;
task ``r`` of a stage writes ``<work>/<stage>/<r>.jsonl`` and the next stage's task ``r`` reads
exactly that file (datatrove's dedup filters count documents in the order their signature
stage saw them). The kept documents, with their source in ``metadata.source``, become the
pieces the tokenizer reads; the count each step removed (datatrove's ``dropped`` statistics)
goes into the manifest. A rerun skips the tasks datatrove logged as completed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.filters import (
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
)
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from llamalab.data.text_stream import Piece, plan_pieces, read_piece

_WORD = re.compile(r"\w+|[^\w\s]+")
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?:\s+|$)|\n+")


class SplitWords(WordTokenizer):
    """Words and sentences by regular expression, for any language written with spaces.
    datatrove's own English tokenizer needs spaCy, which llamalab does not install; the
    filters and MinHash get this one instead (datatrove accepts a tokenizer in ``language``)."""

    def word_tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text[a:b].strip() for a, b in self.span_tokenize(text) if text[a:b].strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for match in _SENTENCE_END.finditer(text):
            if match.end() > start:
                spans.append((start, match.end()))
                start = match.end()
        if start < len(text):
            spans.append((start, len(text)))
        return spans


WORDS = SplitWords("any")


class ReadPieces(PipelineStep):
    """The corpus's pieces as datatrove documents: task ``rank`` reads pieces
    ``rank, rank + world_size, ...``; ``metadata.source`` keeps each document's source."""

    name = "read sources"
    type = "📖 - READER"

    def __init__(self, pieces: list[Piece]) -> None:
        super().__init__()
        self.pieces = pieces

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        for piece in self.pieces[rank::world_size]:
            for source, line, text in read_piece(piece):
                self.stat_update("documents")
                yield Document(text=text, id=f"{source}:{line}", metadata={"source": source})


class ReadRankFile(PipelineStep):
    """What task ``rank`` of the previous stage wrote (nothing when it kept no document)."""

    name = "read previous stage"
    type = "📖 - READER"

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        path = Path(self.folder) / f"{rank:05d}.jsonl"
        if not path.is_file():
            return
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                yield Document(record["text"], record["id"], metadata=record.get("metadata", {}))


class WriteRankFile(PipelineStep):
    """Task ``rank``'s kept documents to ``<folder>/<rank>.jsonl`` (renamed into place when
    complete; datatrove's own JsonlWriter needs orjson, which llamalab does not install)."""

    name = "write kept documents"
    type = "💽 - WRITER"

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{rank:05d}.jsonl"
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            for doc in data or ():
                record = {"text": doc.text, "id": doc.id, "metadata": doc.metadata}
                handle.write(json.dumps(record) + "\n")
                self.stat_update("written")
        os.replace(tmp, path)
        return
        yield  # a generator step, like datatrove's writers


def _text(doc: Document) -> bytes:
    return doc.text.encode("utf-8")


def _read(work: Path, folder: str) -> ReadRankFile:
    return ReadRankFile(str(work / folder))


def _writer(folder: Path) -> WriteRankFile:
    return WriteRankFile(folder)


def clean_corpus(
    pieces: list[Piece], work: Path, settings: dict[str, Any], workers: int
) -> tuple[list[Piece], dict[str, int]]:
    """Run the enabled steps over ``pieces``; the kept documents' pieces and, per step, how
    many documents it removed."""
    tasks = max(1, workers)
    filters: list[PipelineStep] = []
    if settings.get("min_words") or settings.get("max_words"):
        filters.append(
            GopherQualityFilter(
                min_doc_words=settings.get("min_words"),
                max_doc_words=settings.get("max_words"),
                min_avg_word_length=None,
                max_avg_word_length=None,
                max_symbol_word_ratio=None,
                max_bullet_lines_ratio=None,
                max_ellipsis_lines_ratio=None,
                max_non_alpha_words_ratio=None,
                min_stop_words=None,
                language=WORDS,  # type: ignore[arg-type]
            )
        )
    if settings.get("repetition"):
        filters.append(GopherRepetitionFilter(language=WORDS))  # type: ignore[arg-type]
    if settings.get("language"):
        filters.append(
            LanguageFilter(
                languages=list(settings["language"]),
                language_threshold=float(settings.get("language_threshold", 0.65)),
            )
        )
    folder = "filtered"
    stages: list[tuple[str, list[PipelineStep], int]] = [
        (folder, [ReadPieces(pieces), *filters, _writer(work / folder)], tasks)
    ]
    if settings.get("exact_dedup"):
        config = ExactDedupConfig(content_getter=_text)
        sigs, dups = str(work / "exact_sigs"), str(work / "exact_dups")
        stages += [
            ("exact_sigs", [_read(work, folder), ExactDedupSignature(sigs, config=config)], tasks),
            ("exact_find", [ExactFindDedups(sigs, dups, config=config)], 1),
            ("exact_deduped", [_read(work, folder), ExactDedupFilter(dups, config=config), _writer(work / "exact_deduped")], tasks),
        ]  # fmt: skip
        folder = "exact_deduped"
    if settings.get("minhash"):
        # sha1: datatrove 0.10's xxhash path hands str to xxhash, which refuses it
        mh = MinhashConfig(hash_config=HashConfig(hash_fc="sha1"))
        sigs, buckets, remove = (str(work / n) for n in ("mh_sigs", "mh_buckets", "mh_remove"))
        stages += [
            ("mh_sigs", [_read(work, folder), MinhashDedupSignature(sigs, config=mh, language=WORDS)], tasks),  # type: ignore[arg-type]
            ("mh_buckets", [MinhashDedupBuckets(sigs, buckets, config=mh)], mh.num_buckets),
            ("mh_cluster", [MinhashDedupCluster(buckets, remove, config=mh)], 1),
            ("near_deduped", [_read(work, folder), MinhashDedupFilter(remove), _writer(work / "near_deduped")], tasks),
        ]  # fmt: skip
        folder = "near_deduped"
    for name, pipeline, n_tasks in stages:
        LocalPipelineExecutor(
            pipeline,
            tasks=n_tasks,
            workers=min(n_tasks, tasks),
            logging_dir=str(work / "logs" / name),
        ).run()
    removed = _removed(work / "logs", [name for name, _, _ in stages])
    out = work / folder
    kept = sorted(out.glob("*.jsonl")) if out.is_dir() else []
    clean_pieces = [
        Piece(p.source, p.path, "clean", p.start, p.stop, p.first_line)
        for file in kept
        for p in plan_pieces(file)
    ]
    return clean_pieces, removed


# datatrove's step names -> the data.clean option that turned the step on
STEP_NAMES = {
    "Gopher Quality": "min_words/max_words",
    "Gopher Repetition": "repetition",
    "Language": "language",
    "exact-deduplication": "exact_dedup",
    "MinHash": "minhash",
}


def _removed(logs: Path, names: list[str]) -> dict[str, int]:
    """Documents each step dropped, from datatrove's merged ``stats.json`` of each stage."""
    removed: dict[str, int] = {}
    for name in names:
        try:
            stats = json.loads((logs / name / "stats.json").read_text())
        except (OSError, ValueError):
            continue
        for step in stats:
            dropped = step.get("stats", {}).get("dropped")
            label = next((v for k, v in STEP_NAMES.items() if k in step.get("name", "")), None)
            if dropped is not None and label is not None:
                total = dropped.get("total", dropped) if isinstance(dropped, dict) else dropped
                removed[label] = removed.get(label, 0) + int(total)
    return removed

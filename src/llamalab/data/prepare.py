"""Prepare a pretraining corpus once: tokenized chunked shards (litdata) and a manifest.

``src/prepare.py data.path=SRC data.name=NAME`` calls :func:`prepare_corpus`. The corpus is read
as a stream of pieces (:mod:`llamalab.data.text_stream`), optionally cleaned and deduplicated
first (:mod:`llamalab.data.clean`, datatrove), then tokenized by ``litdata.optimize`` with N
worker processes into chunks that ``litdata.StreamingDataset(item_loader=TokensLoader(seq_len))``
reads as windows. Each document is stored as ``[BOS] + tokens + [EOS]`` (uint16 ids below 65536
pieces, else int32). Layout of the output directory::

    plan.json                 what is being prepared (written first; a restart must match it)
    tokenizer.model           the tokenizer the ids come from
    parts/00000/train/        litdata chunks + index.json of the training documents of part 0
    parts/00000/val/          the held-out documents of part 0 (absent when it has none)
    parts/00000/done.json     written once both are complete: token and document counts
    manifest.json             written last: what training reads (see `prepare_corpus`)

Pieces are grouped into parts of about ``part_bytes``; a part is the unit of restart: an
interrupted preparation rerun with the same command skips the parts that have ``done.json``
and rewrites the others from scratch, so no half-written chunk is ever listed in a manifest
(training reads only ``manifest.json``). Parts can also be divided over machines
(``num_nodes`` / ``node_rank``): each prepares the parts ``p % num_nodes == node_rank`` and the
one that finds all parts done writes the manifest.

A document goes to validation when the hash of its text falls below ``val_fraction`` (the same
split for any number of workers, and exact duplicates never straddle it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from litdata import TokensLoader, optimize

from llamalab.data.clean import clean_corpus
from llamalab.data.errors import DataError
from llamalab.data.text_stream import Piece, count_documents, plan_pieces, read_piece
from llamalab.data.tokens import file_sha256
from llamalab.tokenizer import Tokenizer

log = logging.getLogger("llamalab")

FORMAT_VERSION = 1
MANIFEST, PLAN, DONE, TOKENIZER = "manifest.json", "plan.json", "done.json", "tokenizer.model"
CHUNK_TOKENS = 2**24  # tokens per litdata chunk (32 MiB as uint16)
PART_BYTES = 2**32  # source bytes per restartable part
ENCODE_BATCH = 256


def is_validation(text: str, val_fraction: float) -> bool:
    """Whether a document is held out: its text's hash, as a fraction of 2^64, is below
    ``val_fraction``."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


@dataclass(frozen=True)
class TokenizePieces:
    """The function litdata's workers run: piece index -> token arrays of one split, one per
    document; when a piece is done its counts go to ``counts_dir`` (JSON per piece)."""

    pieces: tuple[Piece, ...]
    tokenizer_path: str
    split: str
    val_fraction: float
    counts_dir: str

    def __call__(self, index: int) -> Iterator[np.ndarray]:
        tokenizer = _worker_tokenizer(self.tokenizer_path)
        dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.int32
        counts: dict[str, list[int]] = {}
        batch: list[tuple[str, str]] = []
        want_val = self.split == "val"
        for source, _line, text in read_piece(self.pieces[index]):
            if is_validation(text, self.val_fraction) != want_val:
                continue
            batch.append((source, text))
            if len(batch) >= ENCODE_BATCH:
                yield from _encode(tokenizer, batch, dtype, counts)
                batch = []
        yield from _encode(tokenizer, batch, dtype, counts)
        path = Path(self.counts_dir) / f"{self.split}-{index:06d}.json"
        _write_json(path, counts)


_TOKENIZERS: dict[str, Tokenizer] = {}


def _worker_tokenizer(path: str) -> Tokenizer:
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = Tokenizer(path)
    return _TOKENIZERS[path]


def _encode(
    tokenizer: Tokenizer,
    batch: list[tuple[str, str]],
    dtype: type,
    counts: dict[str, list[int]],
) -> Iterator[np.ndarray]:
    if not batch:
        return
    for (source, _), ids in zip(batch, tokenizer.encode_batch([t for _, t in batch], True, True)):
        entry = counts.setdefault(source, [0, 0])
        entry[0] += 1
        entry[1] += len(ids)
        yield np.asarray(ids, dtype=dtype)


def _write_json(path: Path, value: Any) -> None:
    """Written under a temporary name, then renamed: a reader sees all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def group_parts(pieces: list[Piece], part_bytes: int) -> list[list[int]]:
    """Consecutive piece indices grouped into parts of about ``part_bytes`` of source."""
    parts: list[list[int]] = [[]]
    size = 0
    for index, piece in enumerate(pieces):
        weight = _piece_bytes(piece)
        if parts[-1] and size + weight > part_bytes:
            parts.append([])
            size = 0
        parts[-1].append(index)
        size += weight
    return parts


def _piece_bytes(piece: Piece) -> int:
    if piece.kind in ("jsonl", "clean"):
        return piece.stop - piece.start
    if piece.kind == "txt":
        return os.path.getsize(piece.path)
    return 2**20  # parquet row groups, saved rows, hf streams: a nominal size


@dataclass
class PrepareSettings:
    """What a preparation is made of; a restart in the same directory must match it."""

    source: str
    tokenizer_sha256: str
    val_fraction: float = 0.01
    chunk_tokens: int = CHUNK_TOKENS
    part_bytes: int = PART_BYTES
    clean: dict[str, Any] | None = None


def prepare_corpus(
    settings: PrepareSettings,
    output_dir: str | os.PathLike[str],
    tokenizer: Tokenizer,
    workers: int = 1,
    num_nodes: int = 1,
    node_rank: int | None = None,
    check: bool = True,
    verbose: bool = True,
) -> dict[str, Any] | None:
    """Prepare ``settings.source`` into ``output_dir``; returns the manifest (None when this
    node finished its parts but others are still running).

    The manifest: ``format``, ``tokenizer_sha256``, ``vocab_size``, ``dtype``, ``source``,
    ``val_fraction``, ``tokens`` / ``documents`` per split, ``per_source`` (documents and
    tokens of each source file per split), ``filters`` (documents each cleaning step removed),
    and ``parts`` (the train/val directories training reads, with their token counts).

    Raises DataError before any tokenization for a missing source, a malformed record (its
    file, line and field), or an output directory begun with another tokenizer or settings.
    """
    out = Path(output_dir)
    if not 0.0 <= settings.val_fraction < 1.0:
        raise DataError(f"must be in [0, 1), got {settings.val_fraction}", field="val_fraction")
    if file_sha256(tokenizer.model_path) != settings.tokenizer_sha256:
        raise DataError("does not match the tokenizer file", field="tokenizer_sha256")
    wanted = {"format": FORMAT_VERSION, **settings.__dict__}
    done = _read_json(out / MANIFEST)
    if done is not None:
        _check_same(out, done, wanted)
        log.info("%s is already prepared", out)
        return done
    source = settings.source
    pieces = plan_pieces(source)  # a missing source stops here
    filters: dict[str, int] = {}
    if settings.clean:
        pieces, filters = clean_corpus(pieces, out / "clean", settings.clean, workers)
        if not pieces:
            raise DataError(f"no document left after cleaning (removed: {filters})", path=source)
    plan = {**wanted, "pieces": [p.to_dict() for p in pieces]}
    previous = _read_json(out / PLAN)
    if previous is not None:
        _check_same(out, previous, wanted)
        plan["pieces"] = previous["pieces"]
        pieces = [Piece(**p) for p in previous["pieces"]]
    else:
        _write_json(out / PLAN, plan)
    shutil.copyfile(tokenizer.model_path, out / TOKENIZER)
    parts = group_parts(pieces, settings.part_bytes)
    mine = [p for p in range(len(parts)) if node_rank is None or p % num_nodes == node_rank]
    todo = [p for p in mine if _read_json(out / "parts" / f"{p:05d}" / DONE) is None]
    if check and todo:
        count_documents([pieces[i] for p in todo for i in parts[p]])  # bad records stop here
    for p in todo:
        _prepare_part(out, p, parts[p], pieces, tokenizer, settings, workers, verbose)
    states = [_read_json(out / "parts" / f"{p:05d}" / DONE) for p in range(len(parts))]
    if any(state is None for state in states):
        log.info("this node's parts are done; the last node to finish writes the manifest")
        return None
    manifest = _manifest(wanted, tokenizer, states, filters)
    _write_json(out / MANIFEST, manifest)
    return manifest


def _check_same(out: Path, found: dict[str, Any], wanted: dict[str, Any]) -> None:
    if found.get("tokenizer_sha256") != wanted["tokenizer_sha256"]:
        raise DataError(
            f"{out} holds shards made with another tokenizer (sha256 "
            f"{str(found.get('tokenizer_sha256'))[:12]}..., this one "
            f"{wanted['tokenizer_sha256'][:12]}...): choose another data.name or delete it",
            path=str(out / (MANIFEST if "parts" in found else PLAN)),
            field="tokenizer_sha256",
        )
    for key, value in wanted.items():
        if found.get(key) != value:
            raise DataError(
                f"{out} was prepared with {key}={found.get(key)!r}, this run asks for {value!r}: "
                "choose another data.name or delete it",
                path=str(out / PLAN),
                field=key,
            )


def _prepare_part(
    out: Path,
    part: int,
    indices: list[int],
    pieces: list[Piece],
    tokenizer: Tokenizer,
    settings: PrepareSettings,
    workers: int,
    verbose: bool,
) -> None:
    root = out / "parts" / f"{part:05d}"
    shutil.rmtree(root, ignore_errors=True)  # an interrupted attempt: start the part again
    counts_dir = root / "counts"
    state: dict[str, Any] = {"part": part, "splits": {}}
    for split in ("train", "val"):
        if split == "val" and settings.val_fraction == 0:
            continue
        fn = TokenizePieces(
            tuple(pieces), str(tokenizer.model_path), split, settings.val_fraction, str(counts_dir)
        )
        optimize(
            fn=fn,
            inputs=indices,
            weights=[_piece_bytes(pieces[i]) for i in indices],
            output_dir=str(root / split),
            chunk_size=settings.chunk_tokens,
            item_loader=TokensLoader(),
            num_workers=max(1, min(workers, len(indices))),
            mode="overwrite",
            verbose=verbose,
            # fork where there is one: spawned workers would import torch and llamalab again
            # (seconds each, minutes on a loaded machine); the workers only read and tokenize
            start_method="fork" if sys.platform == "linux" else None,
        )
        finished = sorted(counts_dir.glob(f"{split}-*.json"))
        if len(finished) != len(indices):  # a worker died: its chunks may be incomplete
            raise RuntimeError(
                f"litdata's workers finished {len(finished)} of {len(indices)} pieces of part "
                f"{part} ({split}): see their output above; rerun to retry this part"
            )
        per_source: dict[str, list[int]] = {}
        for file in finished:
            for source, (docs, tokens) in json.loads(file.read_text()).items():
                entry = per_source.setdefault(source, [0, 0])
                entry[0] += docs
                entry[1] += tokens
        tokens = sum(t for _, t in per_source.values())
        if tokens == 0:
            shutil.rmtree(root / split, ignore_errors=True)  # litdata cannot read an empty index
        state["splits"][split] = {"dir": f"parts/{part:05d}/{split}" if tokens else None}
        state["splits"][split]["per_source"] = per_source
    _write_json(root / DONE, state)


def _manifest(
    wanted: dict[str, Any],
    tokenizer: Tokenizer,
    states: list[dict[str, Any]],
    filters: dict[str, int],
) -> dict[str, Any]:
    per_source: dict[str, dict[str, dict[str, int]]] = {}
    parts: list[dict[str, Any]] = []
    for state in states:
        entry: dict[str, Any] = {}
        for split, info in state["splits"].items():
            tokens = 0
            for source, (docs, n) in info["per_source"].items():
                slot = per_source.setdefault(source, {}).setdefault(
                    split, {"documents": 0, "tokens": 0}
                )
                slot["documents"] += docs
                slot["tokens"] += n
                tokens += n
            entry[split] = {"dir": info["dir"], "tokens": tokens}
        parts.append(entry)
    totals = {
        split: {
            key: sum(s.get(split, {}).get(key, 0) for s in per_source.values())
            for key in ("documents", "tokens")
        }
        for split in ("train", "val")
    }
    return {
        **wanted,
        "tokenizer": TOKENIZER,
        "vocab_size": tokenizer.vocab_size,
        "dtype": "uint16" if tokenizer.vocab_size < 2**16 else "int32",
        "totals": totals,
        "per_source": per_source,
        "filters": filters,
        "parts": parts,
    }

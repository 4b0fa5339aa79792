"""Prepared pretraining data: src/prepare.py's shards and manifest, restart after an
interruption, cleaning, the weighted mixture and its resume on another world size, bad input."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from llamalab.data.clean import clean_corpus
from llamalab.data.corpus import builtin_corpus
from llamalab.data.errors import DataError
from llamalab.data.prepare import MANIFEST, PrepareSettings, is_validation, prepare_corpus
from llamalab.data.pretrain import PretrainDataModule
from llamalab.data.shards import check_sources, mixture_order, read_manifest, source_shares
from llamalab.data.text_stream import plan_pieces, read_piece
from llamalab.data.tokens import file_sha256
from llamalab.tokenizer import Tokenizer


def _docs(prefix: str, n: int) -> list[str]:
    return [f"{prefix} document {i}: " + " ".join(f"w{(i * j) % 97}" for j in range(40)) for i in range(n)]  # fmt: skip


def _write(root: Path, prefix: str, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    docs = _docs(prefix, n)
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[: n // 2]))
    (root / "b.txt").write_text("\n\n".join(docs[n // 2 :]) + "\n")
    return root


def _prepare(src: Path, out: Path, tok: Tokenizer, **kwargs) -> dict:
    settings = PrepareSettings(str(src), file_sha256(tok.model_path), val_fraction=0.1)
    manifest = prepare_corpus(settings, out, tok, verbose=False, **kwargs)
    assert manifest is not None
    return manifest


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, small_tok: Tokenizer) -> dict[str, Path]:
    """Two prepared sources ("web" 120 documents, "code" 40), 2 workers, 2 parts for web."""
    root = tmp_path_factory.mktemp("prepared")
    web, code = _write(root / "web_src", "web", 120), _write(root / "code_src", "code", 40)
    settings = PrepareSettings(str(web), file_sha256(small_tok.model_path), 0.1, part_bytes=1)
    prepare_corpus(settings, root / "web", small_tok, workers=2, verbose=False)
    _prepare(code, root / "code", small_tok)
    return {"root": root, "web": root / "web", "code": root / "code", "web_src": web}


def test_manifest_counts_every_document_and_token(prepared, small_tok: Tokenizer) -> None:
    manifest = read_manifest(str(prepared["web"]))
    docs = _docs("web", 120)
    assert manifest["tokenizer_sha256"] == file_sha256(small_tok.model_path)
    assert (prepared["web"] / "tokenizer.model").read_bytes() == small_tok.model_path.read_bytes()
    assert len(manifest["parts"]) == 2  # one per file (part_bytes=1)
    val = [d for d in docs if is_validation(d, 0.1)]
    assert 1 <= len(val) < 30
    per_source = manifest["per_source"]
    assert per_source["a.jsonl"]["train"]["documents"] + per_source["b.txt"]["train"]["documents"] == 120 - len(val)  # fmt: skip
    tokens = sum(len(small_tok.encode(d)) + 2 for d in docs if not is_validation(d, 0.1))
    assert manifest["totals"]["train"]["tokens"] == tokens
    assert manifest["totals"]["val"]["tokens"] == sum(len(small_tok.encode(d)) + 2 for d in val)


def test_an_interrupted_preparation_is_refused_then_resumed(prepared, small_tok, tmp_path) -> None:
    """No manifest: training refuses the directory; the same command redoes only the unfinished
    part, and a stray chunk of the interrupted attempt is gone."""
    out = tmp_path / "web"
    src = prepared["web_src"]
    settings = PrepareSettings(str(src), file_sha256(small_tok.model_path), 0.1, part_bytes=1)
    whole = prepare_corpus(settings, out, small_tok, verbose=False)
    (out / MANIFEST).unlink()
    (out / "parts" / "00001" / "done.json").unlink()
    stray = out / "parts" / "00001" / "train" / "chunk-9-9.bin"
    stray.write_bytes(b"half")
    done0 = (out / "parts" / "00000" / "done.json").stat().st_mtime_ns
    with pytest.raises(DataError, match=r"did not finish: rerun the same prepare\.py command"):
        read_manifest(str(out))
    assert prepare_corpus(settings, out, small_tok, verbose=False) == whole
    assert not stray.exists()
    assert (out / "parts" / "00000" / "done.json").stat().st_mtime_ns == done0  # kept


def test_bad_input_stops_before_tokenizing(tmp_path: Path, small_tok: Tokenizer) -> None:
    src = tmp_path / "src"
    src.mkdir()
    lines = ['{"text": "fine"}', '{"text": "also fine"}', '{"body": "no text"}']
    (src / "c.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:3: field 'text': missing"):
        _prepare(src, tmp_path / "out", small_tok)
    assert not (tmp_path / "out" / "parts").exists()  # nothing tokenized
    with pytest.raises(DataError, match="nowhere: no such file or directory"):
        _prepare(tmp_path / "nowhere", tmp_path / "out2", small_tok)
    (src / "c.jsonl").write_text("\n".join(lines[:2]) + "\n")
    _prepare(src, tmp_path / "out3", small_tok)
    other = Tokenizer.train(builtin_corpus()[300:600], tmp_path / "other.model", 420)
    with pytest.raises(DataError, match=r"field .tokenizer_sha256.: .* another tokenizer"):
        _prepare(src, tmp_path / "out3", other)


def test_jsonl_pieces_know_their_line_numbers(tmp_path: Path) -> None:
    rows = [json.dumps({"text": f"row {i}"}) for i in range(50)] + ['{"text": 7}']
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    pieces = plan_pieces(tmp_path / "d.jsonl", piece_bytes=100)
    assert len(pieces) > 5
    read = [(line, text) for p in pieces[:-1] for _, line, text in read_piece(p)]
    assert read == [(i + 1, f"row {i}") for i in range(len(read))]
    with pytest.raises(DataError, match=r"d\.jsonl:51: field 'text': expected a string"):
        list(read_piece(pieces[-1]))


def test_cleaning_removes_duplicates_and_short_documents(tmp_path: Path) -> None:
    docs = _docs("c", 20)
    rows = docs + docs[:5] + ["too short"]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    pieces, removed = clean_corpus(
        plan_pieces(tmp_path / "s.jsonl"),
        tmp_path / "clean",
        {"exact_dedup": True, "min_words": 5},
        workers=1,
    )
    kept = [(source, text) for p in pieces for source, _, text in read_piece(p)]
    assert sorted(t for _, t in kept) == sorted(docs)
    assert {s for s, _ in kept} == {"s.jsonl"}  # the original source survives cleaning
    assert removed == {"exact_dedup": 5, "min_words/max_words": 1}


# ---------------------------------------------------------------------------- the mixture
def test_mixture_shares_match_the_weights() -> None:
    sizes, weights = [3000, 1000], [1.0, 3.0]
    order = mixture_order(sizes, weights, seed=5, epoch=0)
    assert len(order) == 4000
    share = source_shares(order, sizes)[1]
    sigma = math.sqrt(0.75 * 0.25 / 4000)
    assert abs(share - 0.75) < 4 * sigma  # within sampling error
    # up-sampled: the small source's windows come round in whole laps (counts differ by <= 1)
    counts = Counter(order[order >= 3000].tolist())
    assert len(counts) == 1000 and max(counts.values()) - min(counts.values()) <= 1
    assert order.tolist() == mixture_order(sizes, weights, 5, 0).tolist()
    assert order.tolist() != mixture_order(sizes, weights, 5, 1).tolist()


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ([{"path": "a", "weight": 0}], r"data\.sources\[0\]\.weight': must be positive"),
        ([{"path": "a"}, {"path": "b", "weight": -1}], r"sources\[1\]\.weight': must be positive"),
        ([{"path": "a", "weight": "x"}], r"sources\[0\]\.weight': expected a number"),
        ([{"weight": 1}], r"sources\[0\]': expected \{path"),
        ("outputs/data/web", r"data\.sources': expected a non-empty list"),
    ],
)
def test_bad_sources_name_the_field(sources, message: str) -> None:
    with pytest.raises(DataError, match=message):
        check_sources(sources)


def test_training_refuses_unfinished_or_foreign_shards(prepared, small_tok, tmp_path) -> None:
    other = Tokenizer.train(builtin_corpus()[300:600], tmp_path / "other.model", 420)
    dm = PretrainDataModule(
        sources=[{"path": str(prepared["web"]), "weight": 1}], tokenizer_path=str(other.model_path)
    )
    with pytest.raises(DataError, match=r"web/manifest\.json: field 'tokenizer_sha256'"):
        dm.validate()
    dm = PretrainDataModule(sources=[{"path": str(tmp_path / "missing"), "weight": 1}])
    with pytest.raises(DataError, match="no prepared dataset here"):
        dm.load_tokenizer()


def _fake_trainer(world: int, rank: int) -> SimpleNamespace:
    progress = SimpleNamespace(current=SimpleNamespace(processed=0))
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    return SimpleNamespace(
        world_size=world, global_rank=rank, current_epoch=0, fit_loop=loop, loggers=[]
    )


def test_mixture_resumes_on_another_world_size(prepared) -> None:
    """2 ranks consume 3 batches of 2; resumed on 1 or 3 ranks, the rest of the epoch is the
    uninterrupted order's rest: no window repeated or skipped."""
    sources = [{"path": str(prepared["web"]), "weight": 3}, {"path": str(prepared["code"]), "weight": 1}]  # fmt: skip

    def windows(world: int, state: dict | None) -> list[list[int]]:
        out = []
        for rank in range(world):
            dm = PretrainDataModule(sources=sources, seq_len=16, batch_size=2, seed=3)
            dm.setup("fit")
            dm.trainer = _fake_trainer(world, rank)  # type: ignore[assignment]
            if state:
                dm.load_state_dict(state)
            out.append([i for b in dm.train_dataloader().batch_sampler for i in b])  # type: ignore[union-attr]
        return out

    dm = PretrainDataModule(sources=sources, seq_len=16, batch_size=2, seed=3)
    dm.setup("fit")
    assert dm.train_set is not None and len(dm.train_set.sizes) == 2
    full = mixture_order(dm.train_set.sizes, [3.0, 1.0], 3, 0).tolist()
    first = windows(2, None)
    consumed = [i for r in range(2) for i in first[r][:6]]
    state = {"epoch": 0, "samples_consumed": 12, "seed": 3, "n_windows": len(full)}
    state["mixture"] = dm._mixture_key()
    for world in (1, 3):
        rest = [i for shard in windows(world, state) for i in shard]
        together = Counter(consumed + rest)
        expected = Counter(full[: len(consumed) + len(rest)])
        assert together == expected, f"world size {world}: windows repeated or skipped"
        # only a tail is dropped: the uneven end of the deal and the ranks' incomplete batches
        assert len(full) - len(consumed) - len(rest) < 2 * world


def test_minhash_removes_near_duplicates_and_repetition_filter_repeated_text(
    tmp_path: Path,
) -> None:
    """MinHash (5-grams, 14x8 buckets) drops documents that differ from an earlier one by one
    word of 40 (about 0.9 Jaccard similarity of 5-grams); the repetition filter drops a document made of one line repeated."""
    rng = random.Random(0)  # letters only: MinHash's normalisation maps every digit to 0

    def word() -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))

    docs = [" ".join(word() for _ in range(40)) for _ in range(20)]
    near = [f"{word()} {d.split(' ', 1)[1]}" for d in docs[:4]]  # the first word changed
    repeated = "\n".join(["the same line, said again and again"] * 30)
    rows = docs + near + [repeated]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    pieces, removed = clean_corpus(
        plan_pieces(tmp_path / "s.jsonl"),
        tmp_path / "clean",
        {"minhash": True, "repetition": True},
        workers=1,
    )
    kept = [text for p in pieces for _, _, text in read_piece(p)]
    assert sorted(kept) == sorted(docs)
    assert removed.get("minhash") == 4 and sum(removed.values()) == 5, removed

"""Pretraining data: reading user text, packed windows of prepared shards and exact resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from llamalab.data.corpus import (
    builtin_corpus,
    builtin_corpus_key,
    builtin_tokenizer_path,
    load_builtin_tokenizer,
    read_text_documents,
    source_fingerprint,
)
from llamalab.data.errors import DataError
from llamalab.data.pretrain import PretrainDataModule, ResumableSampler
from llamalab.data.shards import read_manifest
from llamalab.data.stdlib_docs import python_key
from llamalab.tokenizer import Tokenizer

DOCS = [
    "The quick brown fox.\nIt jumps over 12 dogs.",
    "  Leading spaces and a trailing one ",
    "Unicode: caf\u00e9, \U0001f999 and tabs\t.",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.train(builtin_corpus()[:300], tmp_path_factory.mktemp("tok") / "t.model", 400)


# ------------------------------------------------------------------ reading documents
def test_txt_documents_are_blank_line_separated_blocks(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\nstill one\n\n \n\ntwo\n\n\nthree  \n")
    assert read_text_documents(tmp_path / "a.txt") == ["one\nstill one", "two", "three  "]


def test_jsonl_parquet_and_directory(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "b.jsonl").write_text('{"text": "from json"}\n\n{"text": "  "}\n{"text": "two"}\n')
    pq.write_table(pa.table({"text": ["from parquet"], "id": [1]}), tmp_path / "c.parquet")
    (tmp_path / "a.txt").write_text("from txt\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert read_text_documents(tmp_path / "b.jsonl") == ["from json", "two"]
    assert read_text_documents(tmp_path / "c.parquet") == ["from parquet"]
    assert read_text_documents(str(tmp_path)) == ["from txt", "from json", "two", "from parquet"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"text": "ok"}\n{"text": oops}\n', r"b\.jsonl:2: invalid JSON"),
        ('{"text": "ok"}\n\n{"body": "x"}\n', r"b\.jsonl:3: field 'text': missing"),
        ('{"text": 5}\n', r"b\.jsonl:1: field 'text': expected a string, got int"),
        ('["text"]\n', r"b\.jsonl:1: expected a JSON object"),
        ('{"text": " "}\n', r"b\.jsonl: no non-empty document"),
    ],
)
def test_jsonl_errors_name_file_line_and_field(tmp_path: Path, content: str, expected: str) -> None:
    (tmp_path / "b.jsonl").write_text(content)
    with pytest.raises(DataError, match=expected):
        read_text_documents(tmp_path / "b.jsonl")


def test_parquet_errors(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a\.parquet: field 'text': missing column"):
        read_text_documents(tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet:2: field 'text': expected a string"):
        read_text_documents(tmp_path / "b.parquet")


def test_missing_empty_and_unsupported_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere: no such file"):
        read_text_documents(tmp_path / "nowhere")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.txt: no non-empty document"):
        read_text_documents(tmp_path / "empty.txt")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        read_text_documents(tmp_path / "x.csv")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="holds no"):
        read_text_documents(tmp_path / "sub")


def test_datasets_sources(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"text": ["saved one", "saved two"]}).save_to_disk(tmp_path / "ds")
    assert read_text_documents(tmp_path / "ds") == ["saved one", "saved two"]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "train.jsonl").write_text('{"text": "hub style"}\n')
    assert read_text_documents(f"hf:{tmp_path / 'raw'}") == ["hub style"]
    with pytest.raises(DataError, match="hf:"):
        read_text_documents(f"hf:{tmp_path / 'nothing-here'}")


def test_source_fingerprint_follows_file_changes(tmp_path: Path) -> None:
    file = tmp_path / "a.txt"
    file.write_text("one\n")
    first = source_fingerprint(file)
    assert first == source_fingerprint(file)
    file.write_text("one two\n")
    assert source_fingerprint(file) != first
    assert source_fingerprint("hf:anything") is None


def test_builtin_corpus_and_tokenizer_cache(tmp_path: Path) -> None:
    assert builtin_corpus() == builtin_corpus()
    assert python_key() in builtin_corpus_key()
    path = builtin_tokenizer_path(512, tmp_path)
    assert "v512" in path.name and python_key() in path.name
    tok = load_builtin_tokenizer(512, tmp_path)
    assert tok.model_path == path and tok.vocab_size == 512
    mtime = path.stat().st_mtime_ns
    assert load_builtin_tokenizer(512, tmp_path).vocab_size == 512
    assert path.stat().st_mtime_ns == mtime  # loaded, not retrained


# ------------------------------------------------------------------ windows
def test_resumable_sampler_shuffles_shards_and_skips() -> None:
    full = ResumableSampler(10, seed=3)
    epoch0 = list(full)
    assert sorted(epoch0) == list(range(10)) and epoch0 == list(ResumableSampler(10, seed=3))
    full.set_epoch(1)
    assert list(full) != epoch0
    shards = [list(ResumableSampler(10, num_replicas=3, rank=r, seed=3)) for r in range(3)]
    assert all(len(s) == 3 for s in shards)
    assert sorted(i for shard in shards for i in shard) == sorted(epoch0[:9])
    resumed = ResumableSampler(10, seed=3, resume_epoch=0, skip_samples=4)
    assert list(resumed) == epoch0[4:] and len(resumed) == 10
    assert list(resumed) == epoch0  # the skip applies once


# ------------------------------------------------------------------ the data module
class _Recorder(L.LightningModule):
    """Records the first token of every training window it sees; learns nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["input_ids"][:, :3].flatten().tolist())
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(dm: PretrainDataModule, root: Path, max_steps: int, ckpt: str | None = None) -> _Recorder:
    module = _Recorder()
    trainer = L.Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1)
        ],
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return module


@pytest.fixture(scope="module")
def user_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = builtin_corpus()[200:240]  # about 10,000 characters of docstrings
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return path


def test_datamodule_prepares_and_loads(tok: Tokenizer, user_corpus: Path) -> None:
    """``data.path`` is prepared into the cache (once) and streamed like any prepared source."""
    cache = user_corpus.parent / "cache"
    dm = PretrainDataModule(
        path=str(user_corpus), tokenizer_path=str(tok.model_path), seq_len=32, batch_size=4,
        val_fraction=0.1, cache_dir=str(cache),
    )  # fmt: skip
    assert dm.load_tokenizer().vocab_size == 400
    dm.prepare_data()
    dm.setup("fit")
    assert dm.tokenizer is not None and dm.train_set is not None and dm.val_set is not None
    (prepared,) = (cache / "data").glob("corpus.jsonl-*")
    manifest = read_manifest(str(prepared))
    totals = manifest["totals"]
    assert totals["train"]["documents"] + totals["val"]["documents"] == 40
    assert totals["val"]["documents"] >= 1  # held out by document, at preparation
    assert len(dm.train_set) == totals["train"]["tokens"] // 32  # one chunk: whole windows
    first = dm.train_set[0]["input_ids"]
    assert first[0] == tok.bos_id and first.dtype == torch.int64
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 32)
    assert torch.equal(batch["input_ids"], batch["labels"])


def test_datamodule_refuses_a_too_small_corpus(tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "tiny.txt").write_text("a few words only\n")
    dm = PretrainDataModule(
        path=str(tmp_path / "tiny.txt"), tokenizer_path=str(tok.model_path), seq_len=64,
        val_fraction=0.0, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    dm.prepare_data()
    with pytest.raises(DataError, match=r"\d+ training tokens: not one window of seq_len=64"):
        dm.setup("fit")


def test_builtin_datamodule_uses_env_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLAMALAB_CACHE", str(tmp_path))
    dm = PretrainDataModule(vocab_size=384, seq_len=512, batch_size=2)
    dm.prepare_data()
    dm.setup()
    assert dm.tokenizer is not None and dm.tokenizer.vocab_size == 384
    assert builtin_tokenizer_path(384, tmp_path).is_file()
    (prepared,) = (tmp_path / "data").glob("builtin-*")
    totals = read_manifest(str(prepared))["totals"]
    assert totals["train"]["documents"] + totals["val"]["documents"] == len(builtin_corpus())


def test_exact_resume_mid_epoch(tok: Tokenizer, user_corpus: Path, tmp_path: Path) -> None:
    """An interrupted run resumed from its checkpoint sees exactly the uninterrupted batches,
    across an epoch boundary (train windows shuffled by seed + epoch)."""
    kwargs = dict(
        path=str(user_corpus), tokenizer_path=str(tok.model_path), seq_len=64, batch_size=4,
        val_fraction=0.1, cache_dir=str(user_corpus.parent / "cache"), seed=7,
    )  # fmt: skip
    dm = PretrainDataModule(**kwargs)  # type: ignore[arg-type]
    dm.prepare_data()
    dm.setup()
    per_epoch = len(dm.train_set) // 4
    assert 3 <= per_epoch <= 30, per_epoch
    total = per_epoch + 3  # into the second epoch
    reference = _fit(PretrainDataModule(**kwargs), tmp_path / "ref", total).seen  # type: ignore[arg-type]
    for stop in (2, per_epoch + 1):
        first = _fit(PretrainDataModule(**kwargs), tmp_path / f"a{stop}", stop).seen  # type: ignore[arg-type]
        ckpt = next((tmp_path / f"a{stop}").glob(f"*step={stop}.ckpt"))
        state = torch.load(ckpt, weights_only=False)["PretrainDataModule"]
        assert state["samples_consumed"] == 4 * (stop % per_epoch) and state["seed"] == 7
        rest = _fit(PretrainDataModule(**kwargs), tmp_path / f"b{stop}", total, str(ckpt)).seen  # type: ignore[arg-type]
        assert first + rest == reference, f"resume after step {stop} diverged"
    assert len(reference) == total
    assert reference[:per_epoch] != reference[per_epoch : 2 * per_epoch]  # epochs reshuffle


def test_cache_dir_default_is_home_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMALAB_CACHE", raising=False)
    dm = PretrainDataModule()
    assert dm.cache_root == Path(os.path.expanduser("~")) / ".cache" / "llamalab"


def test_resumed_shards_continue_each_rank_exactly() -> None:
    """Two ranks, batch 2, three batches done: each rank's remaining items are its own tail."""
    whole = [list(ResumableSampler(20, num_replicas=2, rank=r, seed=1)) for r in range(2)]
    skip = 3 * 2 * 2  # batches * batch_size * world_size
    for rank in range(2):
        resumed = ResumableSampler(
            20, num_replicas=2, rank=rank, seed=1, resume_epoch=0, skip_samples=skip
        )
        assert list(resumed) == whole[rank][3 * 2 :]

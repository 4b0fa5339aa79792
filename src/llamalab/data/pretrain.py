"""Pretraining data: a weighted mixture of prepared shard directories, streamed, with exact resume.

Every pretraining run reads litdata shards written by :mod:`llamalab.data.prepare`:
``data.sources`` names prepared directories and their weights (:mod:`llamalab.data.shards`);
without it, the built-in corpus (or ``data.path``) is prepared once into the cache through the
same code and read as a one-source mixture. Windows of ``seq_len`` tokens tile each chunk
(documents are packed back to back, BOS/EOS between them, PAPER.md §2.2); validation reads the
held-out split declared when the data was prepared.

Exact resume (``ckpt_path=...``): Lightning saves ``PretrainDataModule.state_dict()`` in the
checkpoint: the epoch and how many training windows the whole world had consumed in it. The
sampler draws epoch ``e``'s global order of windows from ``seed + e`` (for a mixture:
:func:`llamalab.data.shards.mixture_order`); on resume it skips the consumed prefix of that
order before dealing it over ranks, so the run sees exactly the windows an uninterrupted run
would have seen. (With the same world size and batch size this is exact batch for batch; with
different ones, no window of the interrupted epoch is repeated or skipped.)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from llamalab.data.base import StageDataModule
from llamalab.data.corpus import (
    builtin_corpus_key,
    default_cache_dir,
    documents_fingerprint,
    load_builtin_tokenizer,
    source_fingerprint,
)
from llamalab.data.errors import DataError
from llamalab.data.prepare_cache import prepare_in_cache
from llamalab.data.shards import (
    MixtureWindows,
    SourceWindows,
    check_sources,
    check_tokenizer,
    mixture_order,
    read_manifest,
    source_shares,
    source_tokenizer,
)
from llamalab.data.tokens import file_sha256
from llamalab.tokenizer import Tokenizer

log = logging.getLogger("llamalab")


class ResumableSampler(DistributedSampler):
    """Shuffles ``n_items`` per epoch from ``seed + epoch`` and shards them over ranks.

    Subclassing ``DistributedSampler`` keeps Lightning from wrapping it (Lightning still calls
    ``set_epoch``). ``skip_samples`` global items of epoch ``resume_epoch`` are skipped once,
    before sharding; every rank gets ``n_items // num_replicas`` items per full epoch.
    """

    def __init__(
        self,
        n_items: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        resume_epoch: int | None = None,
        skip_samples: int = 0,
    ) -> None:
        # DistributedSampler only needs len(dataset); a range of the item count stands for it.
        items = cast(Dataset, range(n_items))
        super().__init__(items, num_replicas, rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.n_items = n_items
        self.resume_epoch, self.skip_samples = resume_epoch, skip_samples

    def __len__(self) -> int:
        return self.n_items // self.num_replicas

    def global_order(self, epoch: int) -> torch.Tensor:
        """``(n_items,)`` the order of all ranks' items in ``epoch``."""
        if not self.shuffle:
            return torch.arange(self.n_items)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n_items, generator=generator)

    def __iter__(self) -> Iterator[int]:
        order = self.global_order(self.epoch)[: len(self) * self.num_replicas]
        if self.epoch == self.resume_epoch:
            order = order[self.skip_samples :]
            order = order[: len(order) // self.num_replicas * self.num_replicas]  # equal shards
        self.resume_epoch = None  # skip once: later epochs (and restarts of this one) are whole
        return iter(order[self.rank :: self.num_replicas].tolist())


class ResumableDataLoader(DataLoader):
    """A DataLoader that tells Lightning it can resume mid-epoch (so it does not warn that it
    cannot). The position itself lives in ``PretrainDataModule.state_dict``, which counts the
    batches the trainer processed, not the ones the loader prefetched."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        del state_dict  # nothing to restore here: see PretrainDataModule.load_state_dict


class MixtureSampler(ResumableSampler):
    """``ResumableSampler`` whose epoch order is the weighted mixture of several sources
    (:func:`llamalab.data.shards.mixture_order`); ``on_epoch(epoch, shares)`` hears the share
    of each source in the epoch it starts."""

    def __init__(
        self,
        sizes: list[int],
        weights: list[float],
        on_epoch: Callable[[int, list[float]], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(sum(sizes), **kwargs)
        self.sizes, self.weights, self.on_epoch = sizes, weights, on_epoch

    def global_order(self, epoch: int) -> torch.Tensor:
        order = mixture_order(self.sizes, self.weights, self.seed, epoch)
        if self.on_epoch is not None:
            self.on_epoch(epoch, source_shares(order, self.sizes))
        return order


class PretrainDataModule(StageDataModule):
    """Packed pretraining windows streamed from prepared shards.

    Args:
        sources: prepared directories to mix, ``[{path: DIR, weight: W}, ...]`` (weights > 0,
            relative; a source is up-sampled when its share exceeds its size's). None = the
            built-in corpus, or ``path``, prepared into the cache.
        path: raw text to prepare into the cache and train on (formats:
            :mod:`llamalab.data.text_stream`); ignored when ``sources`` is set.
        tokenizer_path: a SentencePiece ``.model``; None = the one ``sources[0]`` was prepared
            with, else the built-in tokenizer of ``vocab_size`` pieces (trained once, cached).
        vocab_size: pieces of the built-in tokenizer.
        seq_len: tokens per window (PAPER.md: 4096; the CPU sizes use less).
        batch_size: windows per micro-batch per rank.
        val_fraction: documents held out for validation when the built-in corpus or ``path``
            is prepared (prepared ``sources`` carry their own split).
        cache_dir: tokenizer and prepared-data cache; None = ``$LLAMALAB_CACHE`` or
            ``~/.cache/llamalab``.
        num_workers: DataLoader workers.
        seed: seeds the per-epoch order of the training windows.
    """

    def __init__(
        self,
        sources: list[dict[str, Any]] | None = None,
        path: str | None = None,
        tokenizer_path: str | None = None,
        vocab_size: int = 4096,
        seq_len: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        cache_dir: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # Lightning runs prepare_data on global rank 0 only, not on each node's first rank: the
        # cache is one directory that every node reads (a shared file system, as outputs/ is),
        # so N nodes must not tokenize the same corpus N times into it (src/prepare.py is the
        # step for a real corpus anyway).
        self.prepare_data_per_node = False
        self.sources = check_sources(sources) if sources is not None else None
        self.path, self.tokenizer_path, self.vocab_size = path, tokenizer_path, vocab_size
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, val_fraction
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.num_workers, self.seed = num_workers, seed
        self._tokenizer: Tokenizer | None = None
        self.mixture: list[tuple[str, float]] = []
        self.train_set: MixtureWindows | None = None
        self.val_set: MixtureWindows | None = None
        self._resume: dict[str, Any] = {}

    # ---------------------------------------------------------------- preparation
    @property
    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer loaded by ``setup`` (None before)."""
        return self._tokenizer

    def load_tokenizer(self) -> Tokenizer:
        """``tokenizer_path``, else the first source's, else the built-in one (trained once)."""
        if self.tokenizer_path is not None:
            return Tokenizer(self.tokenizer_path)
        if self.sources is not None:
            first = self.sources[0][0]
            read_manifest(first)  # a missing or unfinished source is named first
            return Tokenizer(source_tokenizer(first))
        return load_builtin_tokenizer(self.vocab_size, self.cache_root)

    def _prepared(self, tokenizer: Tokenizer) -> list[tuple[str, float]]:
        """``(directory, weight)`` of every source, preparing the built-in corpus or ``path``
        into the cache first (once: a finished preparation is reused)."""
        if self.sources is not None:
            return self.sources
        if self.path is None:
            name, key = "builtin", builtin_corpus_key()
        else:
            name = Path(self.path.removeprefix("hf:")).name
            key = source_fingerprint(self.path) or self.path
        sha = file_sha256(tokenizer.model_path)
        digest = documents_fingerprint([key, sha, repr(self.val_fraction)])[:16]
        out = self.cache_root / "data" / f"{name}-{digest}"
        prepare_in_cache(self.path, out, tokenizer, self.val_fraction)
        return [(str(out), 1.0)]

    def prepare_data(self) -> None:
        """Train/cache the tokenizer and prepare the built-in corpus or ``path`` (Lightning
        runs it once, on global rank 0: ``prepare_data_per_node`` is False)."""
        self._prepared(self.load_tokenizer())

    def validate(self) -> dict[str, Any]:
        """Prepared sources: each finished, and made with this run's tokenizer."""
        if self.sources is None:
            return {}
        tokenizer = self.load_tokenizer()
        sha = file_sha256(tokenizer.model_path)
        for path, _ in self.sources:
            check_tokenizer(path, read_manifest(path), sha, str(tokenizer.model_path))
        return {"sources": len(self.sources)}

    def setup(self, stage: str | None = None) -> None:
        """Open every source's train and validation windows (built by ``prepare_data``)."""
        if self.train_set is not None:
            return
        tokenizer = self._tokenizer = self.load_tokenizer()
        sha = file_sha256(tokenizer.model_path)
        self.mixture = self._prepared(tokenizer)
        train, val = [], []
        for path, _ in self.mixture:
            manifest = read_manifest(path)
            check_tokenizer(path, manifest, sha, str(tokenizer.model_path))
            train.append(SourceWindows(path, manifest, "train", self.seq_len))
            val.append(SourceWindows(path, manifest, "val", self.seq_len))
            if len(train[-1]) == 0:
                tokens = manifest["totals"]["train"]["tokens"]
                raise DataError(
                    f"{tokens} training tokens: not one window of seq_len={self.seq_len} "
                    "(each litdata chunk holds whole windows only)",
                    path=path,
                )
        self.train_set, self.val_set = MixtureWindows(train), MixtureWindows(val)

    # ---------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        world_size, rank = self._world()
        if len(self.train_set) < world_size * self.batch_size:
            raise DataError(
                f"{len(self.train_set)} training windows of {self.seq_len} tokens cannot fill one "
                f"batch of {self.batch_size} on each of {world_size} ranks"
            )
        sampler = MixtureSampler(
            self.train_set.sizes,
            [w for _, w in self.mixture],
            self._log_shares,
            num_replicas=world_size,
            rank=rank,
            seed=self.seed,
        )
        self._apply_resume(sampler)
        return self._loader(self.train_set, ResumableDataLoader, sampler=sampler, drop_last=True)

    def _log_shares(self, epoch: int, shares: list[float]) -> None:
        """The epoch's drawn share of each source, beside its weight: to the log and the
        run's loggers (``data/share/<source>``)."""
        total = sum(w for _, w in self.mixture)
        names = [Path(p).name for p, _ in self.mixture]
        log.info(
            "data mixture, epoch %d: %s",
            epoch,
            ", ".join(
                f"{n} {s:.3f} (weight {w / total:.3f})"
                for n, s, (_, w) in zip(names, shares, self.mixture)
            ),
        )
        trainer = self.trainer
        if trainer is not None and getattr(trainer, "loggers", None):
            metrics = {f"data/share/{n}": s for n, s in zip(names, shares)}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _apply_resume(self, sampler: ResumableSampler) -> None:
        """Hand a checkpoint's data position (``load_state_dict``) to the sampler, once."""
        state, self._resume = self._resume, {}
        if not state:
            return
        if (state.get("seed"), state.get("n_windows"), state.get("mixture")) != (
            self.seed,
            sampler.n_items,
            self._mixture_key(),
        ):
            warnings.warn(
                "the checkpoint's data state was saved for other data or another seed: "
                "the interrupted epoch restarts from its beginning",
                stacklevel=3,
            )
            return
        sampler.resume_epoch, sampler.skip_samples = state["epoch"], state["samples_consumed"]

    def _mixture_key(self) -> list[list[Any]]:
        sizes = self.train_set.sizes if self.train_set is not None else []
        return [[Path(p).name, w, n] for (p, w), n in zip(self.mixture, sizes)]

    def val_dataloader(self) -> DataLoader | list:
        """Every source's held-out windows in order (none: no validation)."""
        assert self.val_set is not None, "call setup() first"
        if len(self.val_set) == 0:
            return []
        return self._loader(self.val_set, DataLoader, shuffle=False, drop_last=False)

    def _loader(self, dataset: Dataset, loader: type[DataLoader], **kwargs: Any) -> DataLoader:
        return loader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    # ---------------------------------------------------------------- exact resume
    def state_dict(self) -> dict[str, Any]:
        """Where training stands in the data: saved by Lightning in every checkpoint."""
        trainer = self.trainer
        if trainer is None or self.train_set is None:
            return {}
        # Micro-batches this rank finished in this epoch (processed, not prefetched: a checkpoint
        # written in on_train_batch_end counts the current batch, as Lightning's restart does).
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        batches = int(progress.processed)  # type: ignore[attr-defined]
        return {
            "epoch": trainer.current_epoch,
            "samples_consumed": batches * self.batch_size * trainer.world_size,
            "seed": self.seed,
            "n_windows": len(self.train_set),
            "mixture": self._mixture_key(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the checkpoint's position; the next ``train_dataloader`` resumes from it."""
        self._resume = dict(state_dict)

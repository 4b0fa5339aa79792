"""Pretraining data: packed fixed-length windows over the token cache, with exact resume.

LLaMA pretraining packs documents back to back (PAPER.md §2.2: sequences of 4096 tokens);
BOS/EOS written into the token cache mark where documents meet, so windows simply tile the token
stream: window ``i`` is ``tokens[i * seq_len : (i + 1) * seq_len]``, non-overlapping. The last
``val_fraction`` of the windows (at least one) is the validation split, fixed by position.

Exact resume (``ckpt_path=...``): Lightning saves ``PretrainDataModule.state_dict()`` in the
checkpoint: the epoch and how many training windows the whole world had consumed in it. The
training sampler draws a permutation from ``torch.Generator().manual_seed(seed + epoch)``; on
resume it skips the consumed prefix of that permutation before sharding it over ranks, so the run
sees exactly the windows an uninterrupted run would have seen. (With the same world size and
batch size this is exact batch for batch; with different ones, no window of the interrupted
epoch is repeated or skipped.)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from llamalab.data.base import StageDataModule
from llamalab.data.corpus import (
    builtin_corpus,
    builtin_corpus_key,
    default_cache_dir,
    documents_fingerprint,
    load_builtin_tokenizer,
    read_text_documents,
    source_fingerprint,
)
from llamalab.data.errors import DataError
from llamalab.data.tokens import TokenCache, build_token_cache, file_sha256
from llamalab.tokenizer import Tokenizer


class PackedTokenDataset(Dataset[dict[str, torch.Tensor]]):
    """Non-overlapping ``seq_len`` windows of ``tokens[start:end]`` (a leftover tail is dropped).

    Items are ``{"input_ids": (seq_len,) int64, "labels": (seq_len,) int64}``, labels equal to
    the inputs: the loss shifts them (docs/interfaces.md), so each window trains ``seq_len - 1``
    next-token predictions.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, start: int = 0, end: int | None = None):
        end = len(tokens) if end is None else end
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        if not 0 <= start <= end <= len(tokens):
            raise ValueError(f"bad token range [{start}, {end}) for {len(tokens)} tokens")
        self.tokens, self.seq_len, self.start, self.end = tokens, seq_len, start, end

    def __len__(self) -> int:
        return (self.end - self.start) // self.seq_len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range ({len(self)} windows)")
        first = self.start + index * self.seq_len
        window = torch.from_numpy(
            np.asarray(self.tokens[first : first + self.seq_len], dtype=np.int64)
        )
        return {"input_ids": window, "labels": window.clone()}

    def __getstate__(self) -> dict[str, Any]:
        # A pickled np.memmap copies its whole content: send spawned workers the file instead.
        state = self.__dict__.copy()
        if isinstance(self.tokens, np.memmap) and self.tokens.filename:
            state["tokens"] = (self.tokens.filename, self.tokens.dtype.str, len(self.tokens))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["tokens"], tuple):
            filename, dtype, length = state["tokens"]
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=(length,))
        self.__dict__.update(state)


def split_windows(n_tokens: int, seq_len: int, val_fraction: float) -> tuple[range, range]:
    """Token ranges ``(train, val)``: whole windows, validation the last ones.

    ``round(n_windows * val_fraction)`` windows (at least one when ``val_fraction > 0``) go to
    validation. Raises DataError when not one training (and one validation) window fits.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_windows = n_tokens // seq_len

    def n_val_windows(n: int) -> int:
        return 0 if val_fraction == 0 else max(1, round(n * val_fraction))

    if n_windows - n_val_windows(n_windows) < 1:
        needed = next(n for n in range(1, 10**9) if n - n_val_windows(n) >= 1)
        raise DataError(
            f"the corpus has {n_tokens} tokens; seq_len={seq_len} with val_fraction={val_fraction} "
            f"needs at least {needed * seq_len} ({needed} windows: one or more for training"
            f"{' and one for validation' if val_fraction else ''})"
        )
    split = (n_windows - n_val_windows(n_windows)) * seq_len
    return range(0, split), range(split, n_windows * seq_len)


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


class PretrainDataModule(StageDataModule):
    """Packed pretraining windows from the built-in corpus or the user's text.

    Args:
        path: text to pretrain on (formats: ``llamalab.data.corpus``); None = built-in corpus.
        tokenizer_path: a SentencePiece ``.model``; None = the built-in tokenizer of
            ``vocab_size`` pieces, trained on the built-in corpus once and cached.
        vocab_size: pieces of the built-in tokenizer (SentencePiece accepts at most about
            31,000 on the built-in corpus); ignored when ``tokenizer_path`` is given.
        seq_len: tokens per window (PAPER.md: 4096; the CPU sizes use less).
        batch_size: windows per micro-batch per rank.
        val_fraction: share of the windows held out for validation (the last ones).
        cache_dir: tokenizer and token caches; None = ``$LLAMALAB_CACHE`` or ``~/.cache/llamalab``.
        num_workers: DataLoader workers (0 is fine: items are memory-map slices).
        seed: seeds the per-epoch shuffle of the training windows.
    """

    def __init__(
        self,
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
        self.path, self.tokenizer_path, self.vocab_size = path, tokenizer_path, vocab_size
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, val_fraction
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.num_workers, self.seed = num_workers, seed
        self._tokenizer: Tokenizer | None = None
        self.cache: TokenCache | None = None
        self.train_set: PackedTokenDataset | None = None
        self.val_set: PackedTokenDataset | None = None
        self._resume: dict[str, Any] = {}

    # ---------------------------------------------------------------- preparation
    @property
    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer loaded by ``setup`` (None before)."""
        return self._tokenizer

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer this module uses (trains the built-in one if not cached yet)."""
        if self.tokenizer_path is not None:
            return Tokenizer(self.tokenizer_path)
        return load_builtin_tokenizer(self.vocab_size, self.cache_root)

    def _build_cache(self, tokenizer: Tokenizer) -> TokenCache:
        if self.path is None:
            documents = builtin_corpus()
            fingerprint = f"{builtin_corpus_key()}:{documents_fingerprint(documents)}"
            source: Any = documents
        else:
            path = self.path
            fingerprint = source_fingerprint(path) or documents_fingerprint(
                read_text_documents(path)
            )
            source = lambda: read_text_documents(path)  # noqa: E731 - read only on a rebuild
        key = documents_fingerprint([fingerprint, file_sha256(tokenizer.model_path)])[:16]
        name = "builtin" if self.path is None else Path(self.path.removeprefix("hf:")).name
        return build_token_cache(
            source, tokenizer, self.cache_root / "tokens" / f"{name}-{key}", fingerprint
        )

    def prepare_data(self) -> None:
        """Train/cache the tokenizer and tokenise the corpus (Lightning runs it on rank 0)."""
        self._build_cache(self.load_tokenizer())

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer and token cache (reused: built by ``prepare_data``) and split."""
        if self.train_set is not None:
            return
        self._tokenizer = self.load_tokenizer()
        self.cache = self._build_cache(self._tokenizer)
        train, val = split_windows(self.cache.n_tokens, self.seq_len, self.val_fraction)
        tokens = self.cache.tokens
        self.train_set = PackedTokenDataset(tokens, self.seq_len, train.start, train.stop)
        self.val_set = PackedTokenDataset(tokens, self.seq_len, val.start, val.stop)

    # ---------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        world_size, rank = self._world()
        if len(self.train_set) < world_size * self.batch_size:
            raise DataError(
                f"{len(self.train_set)} training windows of {self.seq_len} tokens cannot fill one "
                f"batch of {self.batch_size} on each of {world_size} ranks"
            )
        sampler = ResumableSampler(
            len(self.train_set), num_replicas=world_size, rank=rank, seed=self.seed
        )
        self._apply_resume(sampler)
        return self._loader(self.train_set, ResumableDataLoader, sampler=sampler, drop_last=True)

    def _apply_resume(self, sampler: ResumableSampler) -> None:
        """Hand a checkpoint's data position (``load_state_dict``) to the sampler, once."""
        state, self._resume = self._resume, {}
        if not state:
            return
        if (state.get("seed"), state.get("n_windows")) != (self.seed, sampler.n_items):
            warnings.warn(
                "the checkpoint's data state was saved for other data or another seed: "
                "the interrupted epoch restarts from its beginning",
                stacklevel=3,
            )
            return
        sampler.resume_epoch, sampler.skip_samples = state["epoch"], state["samples_consumed"]

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
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
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the checkpoint's position; the next ``train_dataloader`` resumes from it."""
        self._resume = dict(state_dict)

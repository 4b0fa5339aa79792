"""Data order for training: a seeded, sharded sampler that resumes mid-epoch, and the
datamodule base that owns it (loaders, held-out split, checkpoint state).

`ckpt_path=PATH` must resume an interrupted run where it stopped (DESIGN.md, command line).
Lightning restores the loop counters but not the data order, so the datamodules keep this
sampler's state: the epoch's permutation is a pure function of (seed, epoch), and on resume the
first `consumed` indices of it are skipped.

It subclasses `DistributedSampler` only so that Lightning leaves it alone under DDP/FSDP (it
wraps any other sampler in its own `DistributedSamplerWrapper`, which would shard twice): the
sampler shards itself, rank `rank` taking every `num_replicas`-th index of the padded
permutation, like `DistributedSampler`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from llamalab.data.base import StageDataModule
from llamalab.data.errors import DataError
from llamalab.tokenizer import Tokenizer


class ResumableRandomSampler(DistributedSampler):
    """Indices `0..n-1` in a per-epoch seeded order, sharded over ranks, resumable.

    Args:
        n: dataset length.
        seed: the permutation of epoch `e` is `randperm(n, generator=seed + e)`.
        shuffle: False yields `0..n-1` in order (validation).
        num_replicas, rank: data-parallel shards; each rank sees `ceil(n / num_replicas)`
            indices (the permutation is padded by wrapping, as `DistributedSampler` does).
    """

    def __init__(
        self, n: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0
    ) -> None:
        # DistributedSampler.__init__ is skipped on purpose: it needs a process group.
        if n < 0 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"bad sampler arguments n={n}, num_replicas={num_replicas}, rank={rank}"
            )
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.num_samples = math.ceil(n / num_replicas) if n else 0
        self.epoch = 0
        self.consumed = 0  # indices of this rank already yielded in `epoch`
        self._skip = 0  # per-rank indices to skip at the next __iter__ (set by load_state_dict)
        self._skip_replicas = num_replicas  # ... as dealt over this many ranks

    def __len__(self) -> int:
        """Indices per epoch for this rank (a resumed epoch yields fewer; Lightning stops at
        the end of the iterator, and its restored batch counter accounts for the rest)."""
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch; a new epoch forgets what a resume skipped."""
        if epoch != self.epoch:
            self.epoch, self._skip, self.consumed = epoch, 0, 0
            self._skip_replicas = self.num_replicas

    def epoch_indices(
        self, epoch: int, skip: int = 0, skip_replicas: int | None = None
    ) -> list[int]:
        """This rank's index list for `epoch`, after the first `skip` indices of the epoch's
        padded permutation as `skip_replicas` ranks dealt it (default: this sampler's ranks).

        The permutation is padded by wrapping to a multiple of the ranks, as in
        `DistributedSampler`, and dealt round-robin, so ranks that each consumed `c` indices
        consumed its first `c x ranks`. On another world size the rest of that padded order is
        dealt over the new ranks: nothing the old ranks consumed comes again and nothing they
        had not reached is left out, except that the rest is padded again to a multiple of the
        new ranks (fewer than one index per rank, from the epoch's start, like any epoch's
        padding).
        """
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        rest = _padded(order, skip_replicas or self.num_replicas)[skip:]
        rest = _pad_to(rest, order, self.num_replicas)
        return rest[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start, replicas = self._skip, self._skip_replicas
        self._skip, self._skip_replicas = 0, self.num_replicas
        indices = self.epoch_indices(self.epoch, start * replicas, replicas)
        self.consumed = start * replicas // self.num_replicas
        for index in indices:
            self.consumed += 1
            yield index

    def state_dict(self) -> dict[str, Any]:
        """`{"seed", "epoch", "consumed", "num_replicas"}`; `consumed` counts indices this rank
        has yielded in `epoch` (with prefetching, the caller may know better: see
        `load_state_dict`), `num_replicas` the ranks that each consumed that many."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next `__iter__` of `state["epoch"]` skips the `consumed x num_replicas`
        indices the checkpoint's ranks had consumed (`num_replicas` defaults to this sampler's,
        for states saved without it)."""
        if state["seed"] != self.seed:
            raise ValueError(
                f"sampler seed {self.seed} differs from the checkpoint's {state['seed']}"
            )
        self.epoch = int(state["epoch"])
        self._skip_replicas = int(state.get("num_replicas", self.num_replicas))
        self._skip = min(int(state["consumed"]), math.ceil(self.n / self._skip_replicas))
        self.consumed = self._skip * self._skip_replicas // self.num_replicas


def _pad_to(rest: list[int], order: list[int], replicas: int) -> list[int]:
    """`rest` padded to a multiple of `replicas` with indices from the start of `order`."""
    missing = (-len(rest)) % replicas
    if not rest or not missing:
        return rest
    return rest + (order * math.ceil(missing / len(order)))[:missing]


def _padded(order: list[int], replicas: int) -> list[int]:
    """`order` padded by wrapping to a multiple of `replicas` (an epoch's dealt order)."""
    return _pad_to(order, order, replicas)


def holdout_split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of `range(n)` into (train, validation) index lists, each sorted.

    `round(n * val_fraction)` records are held out, at least one when `val_fraction > 0` and
    `n >= 2`, and never all of them.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


class TrainOrder:
    """A datamodule's training sampler plus the state a checkpoint keeps to resume it.

    Lightning prefetches a batch ahead, so the sampler's own count runs ahead of training; when
    a trainer is attached the consumed count is taken from the fit loop's batch counter of the
    current epoch instead (the batches whose step has run, which is also what Lightning counts
    as done when it resumes).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.sampler: ResumableRandomSampler | None = None
        self._pending: dict[str, Any] | None = None

    def sampler_for(self, n: int, trainer: Any = None) -> ResumableRandomSampler:
        """The (one) training sampler over `n` items, sharded like `trainer`, resumed if a
        checkpoint state was loaded."""
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler = self.sampler
        if sampler is None or (sampler.n, sampler.num_replicas, sampler.rank) != (
            n,
            replicas,
            rank,
        ):
            sampler = self.sampler = ResumableRandomSampler(n, self.seed, True, replicas, rank)
        if self._pending is not None:
            sampler.load_state_dict(self._pending)
            self._pending = None
        return sampler

    def state_dict(self, trainer: Any, batch_size: int) -> dict[str, Any]:
        if self.sampler is None:
            return dict(self._pending) if self._pending else {}
        state = self.sampler.state_dict()
        batches = _trainer_batches_this_epoch(trainer)
        if batches is not None:
            state["consumed"] = min(batches * batch_size, self.sampler.num_samples)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.sampler is not None:
            self.sampler.load_state_dict(state)
        else:
            self._pending = dict(state)


def _trainer_batches_this_epoch(trainer: Any) -> int | None:
    """Training batches processed in the current epoch, or None outside `trainer.fit`."""
    if trainer is None or trainer.state.fn != "fit":
        return None
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


class StepBatches:
    """A training loader of whole optimizer steps, handed out as micro-batches.

    ``loader`` yields this rank's rows of one optimizer step at a time (``step_rows`` of them);
    each is cut into micro-batches of ``micro`` rows, and every micro-batch carries
    ``step_tokens``: the labelled tokens (``labels[:, 1:] != ignore``) of this rank's whole step.
    A loss that sums over tokens and divides by the step's count over all ranks (summed once per
    step, :meth:`llamalab.stages.pretrain.LanguageModelStage.step_token_count`) is then the
    token mean of the whole global batch, however it is cut into micro-batches and ranks.
    Lightning sees an ordinary iterable of micro-batches: it accumulates ``step_rows / micro`` of
    them per step, its windows line up with the steps, and the sampler (``.sampler``) counts rows
    as before, so resuming is unchanged.
    """

    def __init__(self, loader: DataLoader, micro: int, ignore_index: int = -100) -> None:
        self.loader, self.micro, self.ignore_index = loader, micro, ignore_index
        self.sampler = loader.sampler
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.micro)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for step in self.loader:
            tokens = (step["labels"][:, 1:] != self.ignore_index).sum()
            rows = step["labels"].shape[0]
            for start in range(0, rows, self.micro):
                part = {k: v[start : start + self.micro] for k, v in step.items()}
                yield {**part, "step_tokens": tokens}


class ResumableDataModule(StageDataModule):
    """What the SFT, preference and prompt datamodules share: the tokenizer, the loaders over
    in-memory `train_data` / `val_data`, and the resumable training order.

    Subclasses fill `train_data` and `val_data` in `setup` (idempotent) and give `collate()`,
    a picklable batch builder (DataLoader workers may be spawned).
    """

    def __init__(
        self,
        tokenizer_path: str | None,
        tokenizer: Tokenizer | None,
        batch_size: int,
        seed: int,
        num_workers: int,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer_path, self._tokenizer = tokenizer_path, tokenizer
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.train_data: list[Any] | None = None
        self.val_data: list[Any] = []
        self._order = TrainOrder(seed)
        self.step_rows: int | None = None  # rows per rank per optimizer step (StepBatches)

    def set_step_rows(self, rows: int) -> None:
        """Hand out training batches as micro-batches of whole optimizer steps of ``rows`` rows
        per rank (:class:`StepBatches`: each knows its step's token count); the runner sets it
        for the stages whose loss is a token mean (SFT, rejection sampling)."""
        if rows < self.batch_size or rows % self.batch_size:
            raise ValueError(f"step rows {rows} must be a multiple of batch_size {self.batch_size}")
        self.step_rows = rows

    def step_loader(self, loader: DataLoader) -> DataLoader | StepBatches:
        """``loader`` (micro-batches), or with :meth:`set_step_rows` the same rows in whole steps
        cut into micro-batches that carry their step's token count."""
        if self.step_rows is None:
            return loader
        steps = DataLoader(
            loader.dataset,
            batch_size=self.step_rows,
            sampler=loader.sampler,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
        )
        return StepBatches(steps, self.batch_size)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self.tokenizer_path is None:
                raise ValueError(f"{type(self).__name__} needs tokenizer_path or tokenizer")
            self._tokenizer = Tokenizer(self.tokenizer_path)
        return self._tokenizer

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer (the entry point checks it against the model before building it)."""
        if self._tokenizer is None and self.tokenizer_path is None:
            raise DataError(
                "no tokenizer: the checkpoint in stage.init has no tokenizer.model next to it; "
                "pass data.tokenizer_path=PATH/tokenizer.model"
            )
        return self.tokenizer

    def collate(self) -> Callable[[list[Any]], Any]:
        raise NotImplementedError

    def _shards(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader | StepBatches:
        self.setup("fit")
        assert self.train_data is not None
        sampler = self._order.sampler_for(len(self.train_data), self.trainer)
        return self.step_loader(self._loader(self.train_data, sampler))

    def val_dataloader(self) -> DataLoader | list:
        """Validation in a fixed order (empty list = no validation)."""
        self.setup("validate")
        if not self.val_data:
            return []
        sampler = ResumableRandomSampler(len(self.val_data), self.seed, False, *self._shards())
        return self._loader(self.val_data, sampler)

    def _loader(self, data: list[Any], sampler: ResumableRandomSampler) -> DataLoader:
        return DataLoader(
            data,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate(),
            num_workers=self.num_workers,
        )

    def state_dict(self) -> dict[str, Any]:
        """Where the training order stands (Lightning keeps it in the checkpoint)."""
        return {"train_order": self._order.state_dict(self.trainer, self.batch_size)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._order.load_state_dict(state_dict.get("train_order", {}))

"""Prompts for PPO and rejection sampling (PAPER.md §3.2.3), with held-out prompts for evaluation.

A prompt is a dialog ending with a user turn, encoded with `encode_dialog` so that it ends with
`[/INST]`: the model's next tokens are the answer. Batches keep prompts as token lists of
different lengths (the generator pads them itself) plus `is_safety` (PPO scores safety prompts
with the safety RM) and `index`, the prompt's position in `records(split)`, so the ground-truth
judge can look up the record of each generation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from llamalab.data.builtin import builtin_prompts
from llamalab.data.errors import DataError
from llamalab.data.formats import Record, load_prompt_records, normalize_prompt
from llamalab.data.sampling import ResumableDataModule, holdout_split
from llamalab.tokenizer import DialogError, Tokenizer

log = logging.getLogger(__name__)


class PromptDataset(Dataset):
    """Encoded prompts of one split: item `{"prompt_ids", "is_safety", "index"}`.

    Prompts longer than `max_prompt_len` tokens are left out (counted in `dropped`): there
    would be no room left to answer. `index` is the position in `records`, dropped or not.
    """

    def __init__(
        self, records: Sequence[Record], tokenizer: Tokenizer, max_prompt_len: int, source: str = ""
    ) -> None:
        self.records = list(records)
        self.items: list[dict[str, Any]] = []
        self.dropped = 0
        for index, record in enumerate(self.records):
            try:
                ids = tokenizer.encode_dialog(record["prompt"])
            except DialogError as err:
                raise DataError(
                    f"record {index + 1}: {err}", source or None, None, "prompt"
                ) from None
            if len(ids) > max_prompt_len:
                self.dropped += 1
                continue
            self.items.append(
                {"prompt_ids": ids, "is_safety": bool(record["is_safety"]), "index": index}
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def collate_prompts(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The prompt batch of docs/interfaces.md: `prompt_ids` list[list[int]], `is_safety` (B,)
    bool, `index` (B,) long."""
    return {
        "prompt_ids": [list(item["prompt_ids"]) for item in items],
        "is_safety": torch.tensor([item["is_safety"] for item in items], dtype=torch.bool),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }


class PromptDataModule(ResumableDataModule):
    """PPO / rejection-sampling prompts (train) and held-out prompts (val).

    Args:
        path: a source `formats.load_prompt_records` reads; None = the built-in prompts
            (`builtin_prompts("train"|"validation", seed)`, which also carry `kind`,
            `reference` and `object` for the ground-truth judge).
        val_path: held-out prompts for a user `path`; else `val_fraction` of `path` is held out.
        tokenizer_path: the SentencePiece model (or pass `tokenizer=`).
        max_prompt_len: longest encoded prompt; longer ones are dropped and counted.
        batch_size: prompts per batch per GPU (PPO: the runner gives rollout_batch / world size).
        builtin_size, builtin_val_size: sizes of the built-in sets (None = their defaults).
    """

    def __init__(
        self,
        path: str | None = None,
        val_path: str | None = None,
        tokenizer_path: str | None = None,
        max_prompt_len: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        builtin_size: int | None = None,
        builtin_val_size: int | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        super().__init__(tokenizer_path, tokenizer, batch_size, seed, num_workers)
        self.path, self.val_path, self.max_prompt_len = path, val_path, max_prompt_len
        self.val_fraction = val_fraction
        self.builtin_sizes = {"train": builtin_size, "val": builtin_val_size}
        self.datasets: dict[str, PromptDataset] = {}

    def _source(self, split: str) -> str:
        if self.path is None:
            return f"builtin:prompts/{split}"
        return str(self.val_path if split == "val" and self.val_path else self.path)

    def _load(self) -> dict[str, list[Record]]:
        if self.path is None:
            loaded: dict[str, list[Record]] = {}
            for split, name in (("train", "train"), ("val", "validation")):
                rows = [
                    dict(r) for r in builtin_prompts(name, self.seed, self.builtin_sizes[split])
                ]
                # Validate like user data, keep the judge's extra fields.
                loaded[split] = [{**row, **normalize_prompt(row)} for row in rows]
            return loaded
        records = load_prompt_records(self.path)
        if self.val_path is not None:
            return {"train": records, "val": load_prompt_records(self.val_path)}
        train_idx, val_idx = holdout_split(len(records), self.val_fraction, self.seed)
        return {"train": [records[i] for i in train_idx], "val": [records[i] for i in val_idx]}

    def setup(self, stage: str | None = None) -> None:
        """Load, validate, split and encode once (idempotent)."""
        if self.train_data is not None:
            return
        for split, records in self._load().items():
            source = self._source(split)
            self.datasets[split] = PromptDataset(
                records, self.tokenizer, self.max_prompt_len, source
            )
            dataset = self.datasets[split]
            log.info(
                "prompts %s: %d kept, %d over %d tokens dropped",
                source,
                len(dataset),
                dataset.dropped,
                self.max_prompt_len,
            )
        if not len(self.datasets["train"]):
            raise DataError(
                f"no prompt fits max_prompt_len={self.max_prompt_len}", self._source("train")
            )
        self.val_data = self.datasets["val"].items
        self.train_data = self.datasets["train"].items

    def records(self, split: str) -> list[Record]:
        """Normalised records of "train" or "val"; a batch's `index` points into this list."""
        self.setup()
        return self.datasets[split].records

    def validate(self) -> dict[str, Any]:
        """Check and encode everything now (before the stage builds a model); a summary."""
        self.setup("fit")
        return {
            "source": self._source("train"),
            "prompts": {split: len(d) for split, d in self.datasets.items()},
            "dropped": {split: d.dropped for split, d in self.datasets.items()},
        }

    def collate(self) -> Callable[[list[Any]], dict[str, Any]]:
        return collate_prompts

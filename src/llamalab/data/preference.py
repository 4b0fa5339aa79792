"""Preference pairs for the reward models and DPO: encoding, the chosen/rejected batch, the
datamodule.

PAPER.md §3.2.2: a reward model reads the prompt (with earlier turns) plus one response and
gives a scalar; the ranking loss compares the chosen and the rejected response of a pair, with a
margin that depends on the rating. Both responses are encoded as full dialogs
`encode_dialog(prompt + [assistant answer])`, so each ends with the answer's EOS, the token
whose value the reward model reads. DPO reads the same rows and sums the policy's log-probs over
the final answer's tokens (its EOS included), which `labels` marks.

Batch (docs/interfaces.md): `input_ids (2B, T)`: chosen rows 0..B-1, rejected rows B..2B-1,
padded with `pad_id`; `attention_mask (2B, T)`; `labels (2B, T)`: the token on the final
answer's tokens and EOS, `IGNORE_INDEX` on the prompt (earlier turns included) and padding, as
in SFT; `rating (B,)` long index into RATINGS (-1 = none); `is_safety (B,)` bool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from llamalab.data.builtin import builtin_preferences
from llamalab.data.errors import DataError
from llamalab.data.formats import Record, load_preference_records, normalize_preference
from llamalab.data.labels import IGNORE_INDEX, parse_rating
from llamalab.data.sampling import ResumableDataModule, holdout_split
from llamalab.tokenizer import DialogError, Tokenizer

log = logging.getLogger(__name__)

PaddingSide = Literal["right", "left"]
KINDS = ("helpful", "safety", "both")  # "both": the helpful and the safety built-in pairs


def encode_answer(
    tokenizer: Tokenizer, prompt: Sequence[Any], answer: str, field: str
) -> tuple[list[int], int]:
    """``encode_dialog(prompt + [assistant answer])`` and the index of the answer's first token
    (the answer runs from there to the closing EOS: SFT's label mask of the last answer)."""
    dialog = [*prompt, {"role": "assistant", "content": answer}]
    try:
        ids, mask = tokenizer.encode_dialog_with_mask(dialog)
    except DialogError as err:
        raise DataError(str(err), field=field) from None
    start = len(mask)
    while start > 0 and mask[start - 1]:
        start -= 1
    return ids, start


def encode_preference(
    tokenizer: Tokenizer, record: Record, max_len: int
) -> tuple[list[int], list[int]] | None:
    """(chosen ids, rejected ids) of a normalised preference record, each the full dialog
    ending with EOS; None when either is longer than `max_len` (cutting would remove the EOS
    the reward is read from, so over-long pairs are dropped, not truncated)."""
    item = encode_preference_item(tokenizer, record, max_len)
    return None if item is None else (item["chosen_ids"], item["rejected_ids"])


def encode_preference_item(
    tokenizer: Tokenizer, record: Record, max_len: int
) -> dict[str, Any] | None:
    """``{"chosen_ids", "chosen_start", "rejected_ids", "rejected_start"}`` of a record (each
    start: where the final answer begins); None when either side is longer than ``max_len``."""
    item: dict[str, Any] = {}
    for key in ("chosen", "rejected"):
        item[f"{key}_ids"], item[f"{key}_start"] = encode_answer(
            tokenizer, record["prompt"], record[key], key
        )
    if max(len(item["chosen_ids"]), len(item["rejected_ids"])) > max_len:
        return None
    return item


def encode_preference_records(
    tokenizer: Tokenizer, records: Sequence[Record], max_len: int, source: str = ""
) -> tuple[list[dict[str, Any]], int]:
    """Items `{"chosen_ids", "chosen_start", "rejected_ids", "rejected_start", "rating" (int,
    -1 none), "is_safety"}` and the number of pairs dropped for length."""
    items, dropped = [], 0
    for index, record in enumerate(records):
        try:
            item = encode_preference_item(tokenizer, record, max_len)
        except DataError as err:
            raise DataError(
                f"record {index + 1}: {err.message}", source or None, None, err.field
            ) from None
        if item is None:
            dropped += 1
            continue
        item["rating"] = parse_rating(record.get("rating"))
        item["is_safety"] = bool(record.get("is_safety", False))
        items.append(item)
    return items, dropped


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, padding_side: PaddingSide = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to the longest: ids (N, T) long and attention_mask (N, T) long (1 =
    real). Left padding puts every row's last token in column T-1 (what generation wants)."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
        ids[i, span] = torch.tensor(list(row), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def answer_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, starts: Sequence[int]
) -> torch.Tensor:
    """``labels (N, T)``: each row's tokens from its answer start (counted in real tokens) to its
    last real token, ``IGNORE_INDEX`` elsewhere; either padding side."""
    real = attention_mask.bool()
    position = real.long().cumsum(dim=1) - 1  # index among the row's real tokens
    start = torch.tensor(list(starts), dtype=torch.long).unsqueeze(1)
    return torch.where(real & (position >= start), input_ids, IGNORE_INDEX)


class PreferenceCollator:
    """Items of `encode_preference_records` -> the preference batch (module docstring); items
    without answer starts (pairs built by hand) give a batch without `labels`."""

    def __init__(self, pad_id: int, padding_side: PaddingSide = "right") -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_id, self.padding_side = pad_id, padding_side

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        rows = [item["chosen_ids"] for item in items] + [item["rejected_ids"] for item in items]
        input_ids, attention_mask = pad_rows(rows, self.pad_id, self.padding_side)
        batch = {
            "input_ids": input_ids,  # (2B, T)
            "attention_mask": attention_mask,  # (2B, T)
            "rating": torch.tensor([item["rating"] for item in items], dtype=torch.long),
            "is_safety": torch.tensor([item["is_safety"] for item in items], dtype=torch.bool),
        }
        if all("chosen_start" in item for item in items):
            starts = [item["chosen_start"] for item in items]
            starts += [item["rejected_start"] for item in items]
            batch["labels"] = answer_labels(input_ids, attention_mask, starts)  # (2B, T)
        return batch


class PreferenceDataModule(ResumableDataModule):
    """Preference pairs for the helpfulness or the safety reward model (PAPER.md §3.2.2) or DPO.

    Args:
        kind: "helpful", "safety" or "both" (the two built-in sets together, DPO's default):
            which built-in mix (and the name in logs).
        path: a source `formats.load_preference_records` reads; None = the built-in pairs
            (`builtin_preferences(kind, "train"|"validation", seed)`).
        val_path: held-out pairs for a user `path`; else `val_fraction` of `path` is held out.
        tokenizer_path: the SentencePiece model (or pass `tokenizer=`).
        max_len: longest encoded prompt + response; longer pairs are dropped and counted.
        batch_size: pairs per micro-batch per GPU (the batch has 2 * batch_size rows).
        padding_side: "right" (default) or "left".
        builtin_size: number of built-in training pairs of each kind (None = the default).
    """

    def __init__(
        self,
        kind: str = "helpful",
        path: str | None = None,
        val_path: str | None = None,
        tokenizer_path: str | None = None,
        max_len: int = 512,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
        padding_side: PaddingSide = "right",
        builtin_size: int | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        super().__init__(tokenizer_path, tokenizer, batch_size, seed, num_workers)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.kind, self.path, self.val_path, self.max_len = kind, path, val_path, max_len
        self.val_fraction, self.padding_side, self.builtin_size = (
            val_fraction,
            padding_side,
            builtin_size,
        )
        self._records: dict[str, list[Record]] = {}
        self.dropped: dict[str, int] = {}

    def _source(self, split: str) -> str:
        if self.path is None:
            return f"builtin:preferences/{self.kind}/{split}"
        return str(self.val_path if split == "val" and self.val_path else self.path)

    def _load(self) -> dict[str, list[Record]]:
        if self.path is None:
            n = self.builtin_size
            kinds = ("helpful", "safety") if self.kind == "both" else (self.kind,)
            train = [r for k in kinds for r in builtin_preferences(k, "train", self.seed, n)]
            val = [r for k in kinds for r in builtin_preferences(k, "validation", self.seed)]
            return {
                "train": [normalize_preference(dict(r)) for r in train],
                "val": [normalize_preference(dict(r)) for r in val],
            }
        records = load_preference_records(self.path)
        if self.val_path is not None:
            return {"train": records, "val": load_preference_records(self.val_path)}
        train_idx, val_idx = holdout_split(len(records), self.val_fraction, self.seed)
        return {"train": [records[i] for i in train_idx], "val": [records[i] for i in val_idx]}

    def records(self, split: str) -> list[Record]:
        """The normalised records of "train" or "val"."""
        self.setup()
        return self._records[split]

    def setup(self, stage: str | None = None) -> None:
        """Load, validate, split and encode once (idempotent)."""
        if self.train_data is not None:
            return
        self._records = self._load()
        data = {}
        for split, records in self._records.items():
            source = self._source(split)
            data[split], self.dropped[split] = encode_preference_records(
                self.tokenizer, records, self.max_len, source
            )
            log.info(
                "%s pairs %s: %d kept, %d over max_len %d dropped",
                self.kind,
                source,
                len(data[split]),
                self.dropped[split],
                self.max_len,
            )
        if not data["train"]:
            raise DataError(f"no training pair fits max_len={self.max_len}", self._source("train"))
        self.val_data, self.train_data = data["val"], data["train"]

    def validate(self) -> dict[str, Any]:
        """Check and encode everything now (before the stage builds a model); a summary."""
        self.setup("fit")
        assert self.train_data is not None
        return {
            "kind": self.kind,
            "source": self._source("train"),
            "pairs": {"train": len(self.train_data), "val": len(self.val_data)},
            "dropped": dict(self.dropped),
        }

    def collate(self) -> Callable[[list[Any]], dict[str, torch.Tensor]]:
        return PreferenceCollator(self.tokenizer.pad_id, self.padding_side)

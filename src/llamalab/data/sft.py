"""SFT data: dialogs -> token ids with answer-only labels, packed or padded, in a datamodule.

PAPER.md §3.1: prompts and answers are concatenated (packed); the loss is zeroed on the prompt,
so only answer tokens are learned. Here a label is the token id where the tokenizer's mask is
True (each assistant answer and the EOS that closes it) and -100 elsewhere: system text, user
turns, `[INST]` markers and every BOS. Labels are aligned with `input_ids`; the loss shifts
(`logits[:, t]` predicts `labels[:, t + 1]`).

Packing and the shift: in a packed row the first token of sample k sits right after the last
token of sample k-1, so the loss would predict it from the previous sample. That token is the
sample's BOS, which belongs to the prompt and is labelled -100: nothing crosses a boundary.
`pack_examples` asserts it. Attention does not cross either: `segment_ids` make it
block-diagonal and `position_ids` restart at 0 in every sample.

GAtt (PAPER.md §3.3): the answers are sampled from a chat model with the instruction on every
user turn (`data.gatt_sampler`, :mod:`llamalab.data.gatt`); for training the instruction stays in
the first user turn only and the loss is zeroed on every turn but the last (`build_gatt_dialog`,
`encode_sft_example(..., learn_only_last=True)`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from llamalab.data.builtin import builtin_gatt, builtin_sft
from llamalab.data.corpus import default_cache_dir
from llamalab.data.errors import DataError
from llamalab.data.formats import Record, load_sft_records, normalize_sft
from llamalab.data.gatt import GattSampling, check_sampler, sampled_records
from llamalab.data.labels import IGNORE_INDEX
from llamalab.data.sampling import ResumableDataModule, holdout_split
from llamalab.tokenizer import DialogError, Message, Tokenizer

log = logging.getLogger(__name__)

Example = dict[str, list[int]]  # {"input_ids": [...], "labels": [...]}, equal lengths
Truncation = Literal["truncate", "drop"]


@dataclass
class EncodeStats:
    """What encoding did to a data set (logged by the datamodule)."""

    examples: int = 0  # kept
    truncated: int = 0  # longer than max_len, cut to max_len
    dropped: int = 0  # longer than max_len with truncation="drop", or no answer token left
    tokens: int = 0  # kept tokens
    label_tokens: int = 0  # kept tokens that carry a label


def _last_answer_only(mask: list[bool]) -> list[bool]:
    """Keep only the last run of True (the last answer and its EOS: answers are separated by
    the next turn's BOS and user tokens, which are False)."""
    end = len(mask) - 1
    while end >= 0 and not mask[end]:
        end -= 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return [start <= i <= end for i in range(len(mask))]


def encode_sft_example(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    max_len: int,
    truncation: Truncation = "truncate",
    learn_only_last: bool = False,
    stats: EncodeStats | None = None,
) -> Example | None:
    """Token ids and labels of one training dialog (ending with an assistant answer).

    Returns `{"input_ids", "labels"}` (lists of equal length <= max_len) with
    `labels[i] = input_ids[i]` on answer tokens and their EOS, -100 elsewhere; only the last
    answer with `learn_only_last` (GAtt). Over-long dialogs are cut to `max_len` or dropped
    (`truncation`); a dialog left without any labelled token is dropped. Dropped -> None.
    `labels[0]` is always -100 (BOS), which packing relies on.
    """
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    stats = stats if stats is not None else EncodeStats()
    try:
        ids, mask = tokenizer.encode_dialog_with_mask(messages)
    except DialogError as err:
        raise DataError(str(err), field="messages") from None
    if learn_only_last:
        mask = _last_answer_only(mask)
    labels = [token if learned else IGNORE_INDEX for token, learned in zip(ids, mask)]
    if len(ids) > max_len:
        if truncation == "drop":
            stats.dropped += 1
            return None
        ids, labels = ids[:max_len], labels[:max_len]
        stats.truncated += 1
    if all(label == IGNORE_INDEX for label in labels):
        stats.dropped += 1
        return None
    stats.examples += 1
    stats.tokens += len(ids)
    stats.label_tokens += sum(label != IGNORE_INDEX for label in labels)
    return {"input_ids": ids, "labels": labels}


def build_gatt_dialog(instruction: str, messages: Sequence[Message]) -> tuple[list[Message], bool]:
    """The GAtt training form of a dialog sampled with `instruction` on every user turn.

    PAPER.md §3.3: the instruction is kept only in the first user turn (prefixed, as
    `f"{instruction} {text}"`), removed from later user turns, and the loss is zeroed on every
    earlier turn. Returns `(messages, learn_only_last)`, `learn_only_last` always True, to pass
    to `encode_sft_example`.
    """
    out: list[Message] = []
    first_user = True
    for message in messages:
        content = message["content"]
        if message["role"] == "user":
            bare = (
                content.removeprefix(instruction).lstrip()
                if content.startswith(instruction)
                else content
            )
            content = f"{instruction} {bare}" if first_user else bare
            first_user = False
        out.append({"role": message["role"], "content": content})
    return out, True


def pack_examples(
    examples: Iterable[Example], seq_len: int, pad_id: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Greedily pack examples, in order, into rows of exactly `seq_len` tokens.

    A sample goes into the current row if it fits, else starts a new one (samples are never
    split). Each row: `input_ids`, `labels` (-100 on padding), `segment_ids` (1..k for the k
    samples, 0 on trailing padding), `position_ids` (0.. within each sample, 0 on padding),
    all `(seq_len,)` long. See the module docstring for why boundaries are safe.
    """
    rows: list[dict[str, torch.Tensor]] = []
    current: list[Example] = []
    used = 0
    for example in examples:
        n = len(example["input_ids"])
        if not 0 < n <= seq_len or len(example["labels"]) != n:
            raise ValueError(f"cannot pack an example of {n} tokens into rows of {seq_len}")
        # The loss predicts a sample's first label from the previous sample's last token.
        if example["labels"][0] != IGNORE_INDEX:
            raise ValueError("a packed sample must start with an unlabelled token (its BOS)")
        if used + n > seq_len:
            rows.append(_pack_row(current, seq_len, pad_id))
            current, used = [], 0
        current.append(example)
        used += n
    if current:
        rows.append(_pack_row(current, seq_len, pad_id))
    return rows


def _pack_row(examples: list[Example], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    row = {
        "input_ids": torch.full((seq_len,), pad_id, dtype=torch.long),
        "labels": torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long),
        "segment_ids": torch.zeros(seq_len, dtype=torch.long),
        "position_ids": torch.zeros(seq_len, dtype=torch.long),
    }
    start = 0
    for segment, example in enumerate(examples, start=1):
        end = start + len(example["input_ids"])
        row["input_ids"][start:end] = torch.tensor(example["input_ids"])
        row["labels"][start:end] = torch.tensor(example["labels"])
        row["segment_ids"][start:end] = segment
        row["position_ids"][start:end] = torch.arange(end - start)
        start = end
    return row


def pad_batch(examples: Sequence[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest: `input_ids` (B, T) with `pad_id`, `labels` (B, T)
    with -100, `attention_mask` (B, T) 1 on real tokens (positions default to
    `cumsum(mask) - 1` in the model)."""
    if not examples:
        raise ValueError("cannot pad an empty batch")
    width = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
    }
    for i, example in enumerate(examples):
        n = len(example["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(example["input_ids"])
        batch["labels"][i, :n] = torch.tensor(example["labels"])
        batch["attention_mask"][i, :n] = 1
    return batch


def stack_rows(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batch packed rows: every field stacked to (B, seq_len)."""
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def encode_sft_records(
    tokenizer: Tokenizer,
    records: Sequence[Record],
    max_len: int,
    truncation: Truncation = "truncate",
    source: str = "",
) -> tuple[list[Example], EncodeStats]:
    """Encode normalised SFT records (GAtt ones, with `instruction`, learn only the last answer)."""
    stats = EncodeStats()
    examples = []
    for index, record in enumerate(records):
        messages, only_last = record["messages"], False
        if "instruction" in record:
            messages, only_last = build_gatt_dialog(record["instruction"], messages)
        try:
            example = encode_sft_example(tokenizer, messages, max_len, truncation, only_last, stats)
        except DataError as err:
            raise DataError(
                f"record {index + 1}: {err.message}", source or None, None, err.field
            ) from None
        if example is not None:
            examples.append(example)
    return examples, stats


def prompt_of(messages: Sequence[Message]) -> list[Message]:
    """The dialog up to its last user turn (a generation prompt)."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return [dict(m) for m in messages[: last_user + 1]]


class SFTDataModule(ResumableDataModule):
    """SFT data for Lightning: validated, encoded, split, packed or padded, resumable.

    Args:
        path: a source `formats.load_sft_records` reads; None = the built-in dialogs
            (`builtin_sft`, plus `builtin_gatt` with `gatt=True`).
        tokenizer_path: the SentencePiece model (or pass `tokenizer=`).
        seq_len: packed row length (also the default `max_len`).
        batch_size: rows (packing) or dialogs (padding) per micro-batch, per GPU.
        packing: pack into fixed rows (PAPER.md §3.1) instead of padding each batch.
        val_fraction: share of records held out for validation loss and sample generations.
        seed: split, packing order and per-epoch shuffle.
        max_len: longest encoded dialog (<= seq_len when packing); longer -> `truncation`.
        truncation: "truncate" (cut at max_len) or "drop".
        num_workers: DataLoader workers.
        gatt: Ghost Attention (PAPER.md §3.3): with the built-in data, add the built-in GAtt
            dialogs; with a user file, its `{"instruction", "messages"}` records. Either way
            their answers are sampled by `gatt_sampler` with the instruction on every user turn
            (:mod:`llamalab.data.gatt`). Without `gatt`, a file's GAtt records are used as
            written. `builtin_size`, `gatt_size` size the built-in sets (None = defaults).
        gatt_sampler: the chat model that samples the GAtt answers (a path `load_model` reads;
            None = `<outputs_root>/sft/latest`), or `rules`: the answers as written (the
            built-in ones rewritten by rule). Checked here: a missing path stops the run.
        gatt_sampling: `GattSampling` settings (max_new_tokens, temperature, top_p, batch_size,
            device, wait_s).
        cache_dir: where the sampled GAtt dialogs are cached (None = `$LLAMALAB_CACHE` or
            `~/.cache/llamalab`).
        n_val_prompts: how many validation dialogs `val_prompts()` returns.
    """

    def __init__(
        self,
        path: str | None = None,
        tokenizer_path: str | None = None,
        seq_len: int = 512,
        batch_size: int = 8,
        packing: bool = True,
        val_fraction: float = 0.05,
        seed: int = 0,
        max_len: int | None = None,
        truncation: Truncation = "truncate",
        num_workers: int = 0,
        gatt: bool = False,
        builtin_size: int | None = None,
        gatt_size: int | None = None,
        n_val_prompts: int = 8,
        tokenizer: Tokenizer | None = None,
        gatt_sampler: str | None = None,
        gatt_sampling: dict[str, Any] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(tokenizer_path, tokenizer, batch_size, seed, num_workers)
        self.max_len = seq_len if max_len is None else max_len
        if packing and self.max_len > seq_len:
            raise ValueError(f"max_len {self.max_len} exceeds the packed row length {seq_len}")
        if truncation not in ("truncate", "drop"):
            raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
        self.path, self.seq_len, self.packing = path, seq_len, packing
        self.val_fraction, self.truncation = val_fraction, truncation
        self.gatt, self.n_val_prompts = gatt, n_val_prompts
        self.builtin_size, self.gatt_size = builtin_size, gatt_size
        self.gatt_sampler = check_sampler(gatt_sampler) if gatt else None
        self.gatt_sampling = GattSampling.from_dict(gatt_sampling)
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.train_records: list[Record] = []
        self.val_records: list[Record] = []
        self.stats: dict[str, EncodeStats] = {}

    def _source(self) -> str:
        return str(self.path) if self.path is not None else "builtin:sft"

    def load_records(self) -> list[Record]:
        """Validated, normalised records of `path` or of the built-in sets."""
        if self.path is not None:
            records = load_sft_records(self.path)
            if self.gatt:
                where = [i for i, r in enumerate(records) if "instruction" in r]
                sampled = self._sample_gatt([records[i] for i in where])
                for i, record in zip(where, sampled, strict=True):
                    records[i] = record
            return records
        size = {} if self.builtin_size is None else {"n": self.builtin_size}
        records = [normalize_sft(dict(row)) for row in builtin_sft(self.seed, **size)]
        if self.gatt:
            gatt_size = {} if self.gatt_size is None else {"n": self.gatt_size}
            gatt = [normalize_sft(dict(row)) for row in builtin_gatt(self.seed, **gatt_size)]
            records += self._sample_gatt(gatt)
        return records

    def _sample_gatt(self, records: list[Record]) -> list[Record]:
        assert self.gatt_sampler is not None
        return sampled_records(
            records,
            self.gatt_sampler,
            sampling=self.gatt_sampling,
            seed=self.seed,
            cache_dir=self.cache_root,
            tokenizer=self.tokenizer,
        )

    def prepare_data(self) -> None:
        """Sample and cache the GAtt dialogs (Lightning runs it on local rank 0; the other ranks
        read the cache in `setup`)."""
        if self.gatt and self.train_data is None:
            self.load_records()

    def setup(self, stage: str | None = None) -> None:
        """Load, validate, split and encode once (idempotent; every rank does the same)."""
        if self.train_data is not None:
            return
        records = self.load_records()
        train_idx, val_idx = holdout_split(len(records), self.val_fraction, self.seed)
        self.train_records = [records[i] for i in train_idx]
        self.val_records = [records[i] for i in val_idx]
        train_data = self._encode(self.train_records, "train")
        if not train_data:
            raise DataError(
                "no training example left after encoding (all too long?)", self._source()
            )
        self.val_data = self._encode(self.val_records, "val") if self.val_records else []
        self.train_data = train_data

    def _encode(self, records: list[Record], split: str) -> list[Any]:
        examples, stats = encode_sft_records(
            self.tokenizer, records, self.max_len, self.truncation, self._source()
        )
        self.stats[split] = stats
        log.info("SFT %s %s: %s", split, self._source(), asdict(stats))
        if not self.packing:
            return examples
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.seed))
        return pack_examples(
            [examples[i] for i in order.tolist()], self.seq_len, self.tokenizer.pad_id
        )

    def validate(self) -> dict[str, Any]:
        """Check and encode everything now (before the stage builds a model); a summary."""
        self.setup("fit")
        assert self.train_data is not None
        return {
            "source": self._source(),
            "records": {"train": len(self.train_records), "val": len(self.val_records)},
            "items": {"train": len(self.train_data), "val": len(self.val_data)},
            **{split: asdict(stats) for split, stats in self.stats.items()},
        }

    def collate(self) -> Callable[[list[Any]], dict[str, torch.Tensor]]:
        if self.packing:
            return stack_rows
        return functools.partial(pad_batch, pad_id=self.tokenizer.pad_id)

    def val_prompts(self) -> list[list[Message]]:
        """Up to `n_val_prompts` held-out dialogs cut before their last answer (for sample
        generations during training)."""
        self.setup("validate")
        return [prompt_of(r["messages"]) for r in self.val_records[: self.n_val_prompts]]

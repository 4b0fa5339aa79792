"""Data of the rejection-sampling stage: prompts to sample from, then SFT batches of the chosen
answers (PAPER.md §3.2.3).

The stage samples and chooses before training starts, then hands the chosen dialogs to
:meth:`RejectionSamplingDataModule.set_dialogs`; training batches are SFT batches built by the
SFT data code (answer-only labels, packed rows). Validation batches stay prompt batches: the
stage judges the held-out prompts' answers like PPO does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from torch.utils.data import DataLoader

from llamalab.data.prompts import PromptDataModule
from llamalab.data.sampling import StepBatches
from llamalab.data.sft import encode_sft_records, pack_examples, pad_batch, stack_rows


class RejectionSamplingDataModule(PromptDataModule):
    """Prompts (``PromptDataModule``'s arguments) plus the SFT layout of the chosen answers.

    Args (beyond ``PromptDataModule``'s):
        seq_len: packed row length of the SFT batches (also the longest kept dialog).
        packing: pack dialogs into rows (PAPER.md §3.1) instead of padding each batch.
        batch_size: SFT micro-batch (rows per GPU per forward/backward), and held-out prompts
            per GPU per eval batch.
    """

    def __init__(self, *args: Any, seq_len: int = 512, packing: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seq_len, self.packing = seq_len, packing
        self.sft_items: list[Any] | None = None

    def prompt_items(self, split: str = "train") -> list[dict[str, Any]]:
        """Encoded prompts ``{"prompt_ids", "is_safety", "index"}`` of a split."""
        self.setup()
        return list(self.datasets[split].items)

    def set_dialogs(self, dialogs: Sequence[dict[str, Any]]) -> dict[str, int]:
        """Encode the chosen dialogs (``{"messages": [...]}``) as SFT training data."""
        examples, stats = encode_sft_records(
            self.tokenizer, dialogs, self.seq_len, "drop", "rejection-sampling answers"
        )
        if not examples:
            raise ValueError("no chosen answer fits seq_len: nothing to fine-tune on")
        self.sft_items = (
            pack_examples(examples, self.seq_len, self.tokenizer.pad_id)
            if self.packing
            else examples
        )
        return {"dialogs": stats.examples, "dropped": stats.dropped, "rows": len(self.sft_items)}

    def train_dataloader(self) -> DataLoader | StepBatches:
        if self.sft_items is None:
            raise RuntimeError(
                "the rejection-sampling stage must choose its answers (set_dialogs) before "
                "training batches exist"
            )
        sampler = self._order.sampler_for(len(self.sft_items), self.trainer)
        collate = (
            stack_rows
            if self.packing
            else functools.partial(pad_batch, pad_id=self.tokenizer.pad_id)
        )
        loader = DataLoader(
            self.sft_items,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
        )
        return self.step_loader(loader)

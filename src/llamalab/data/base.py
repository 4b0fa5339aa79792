"""The datamodule protocol: what the runner (:mod:`llamalab.runner.run`) and the stages call on
every stage's data. Pretraining windows (:mod:`llamalab.data.pretrain`) and the in-memory
record datamodules (:mod:`llamalab.data.sampling`) both derive from it."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule

from llamalab.tokenizer import Message, Tokenizer


class StageDataModule(LightningDataModule):
    """A stage's data, as the runner sees it.

    The runner calls, in this order and before any model is built:

    - :meth:`load_tokenizer`: the tokenizer (loaded, or built now), checked against the model's
      vocabulary;
    - :meth:`validate`: load and check all the data now, return a summary (bad data stops here).

    After ``setup``, ``tokenizer`` is the same tokenizer. Datamodules of normalised records
    (prompts, dialogs, preference pairs) also give :meth:`records`: a batch's ``index`` points
    into ``records(split)``. The stages call :meth:`records` (the held-out evaluation's judge)
    and :meth:`val_prompts` (SFT's validation samples).
    """

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer this data is encoded with."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_tokenizer()")

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer the batches are encoded with, once ``setup`` has run."""
        raise NotImplementedError(f"{type(self).__name__} must implement tokenizer")

    def validate(self) -> dict[str, Any]:
        """Load and check everything now; a summary (default: nothing to check ahead)."""
        return {}

    def records(self, split: str) -> list[dict[str, Any]]:
        """The normalised records of ``"train"`` or ``"val"``."""
        raise NotImplementedError(f"{type(self).__name__} has no records (token windows only)")

    def val_prompts(self) -> list[list[Message]]:
        """Held-out dialogs cut before their last answer, answered at each validation (SFT's
        samples); none by default."""
        return []

"""Supervised fine-tuning stage (PAPER.md §3.1): next-token loss on the answers only.

The loss itself is the pretraining stage's (`LanguageModelStage`): SFT batches arrive with
label -100 on every system/user token and every BOS (`llamalab.data.sft`), so the token-mean
over labelled tokens *is* the answer-token loss, in training and in validation (`val/loss`).
Packed rows carry `segment_ids`/`position_ids`, which the model turns into block-diagonal
attention and per-sample positions.

What SFT adds: after each validation pass, answers to a few held-out prompts are generated and
shown (a W&B table when a `WandbLogger` is attached, and `<run dir>/samples/epoch_N.jsonl`
always), with `val/eos_rate`, the share of answers that ended with EOS: a chat model must learn
to stop, which the loss alone does not show.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llamalab.generation import answer_prompts
from llamalab.stages.pretrain import LanguageModelStage

SAMPLE_COLUMNS = ["step", "prompt", "response", "ends_with_eos"]
# Strategies whose parameters are sharded: every rank must take part in each forward pass.
_SHARDED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel")


class SFTStage(LanguageModelStage):
    """SFT from a pretrained (or Meta / Hugging Face) checkpoint given as `init`.

    Args (beyond `LlamaStage`'s):
        batch_size: dialogs (or packed rows) per optimizer step; the entry point turns it into
            gradient accumulation (PAPER.md §3.1: 64).
        epochs: passes over the SFT set (PAPER.md §3.1: 2); the entry point's `max_epochs`.
        sample_generations: held-out prompts answered after each validation pass (0 = none).
        max_new_tokens: longest generated answer, in tokens.
        sample_temperature: 0 = greedy (the default: samples are comparable from one
            validation to the next); Meta's chat default is 0.6 with top-p 0.9.
        sample_top_p: nucleus mass when sampling.
    """

    chat_model = True  # rejection sampling inherits it

    def __init__(
        self,
        *args: Any,
        batch_size: int = 64,
        epochs: int = 2,
        sample_generations: int = 4,
        max_new_tokens: int = 64,
        sample_temperature: float = 0.0,
        sample_top_p: float = 0.9,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if sample_generations < 0 or max_new_tokens < 1:
            raise ValueError(
                "stage.sample_generations must be >= 0 and stage.max_new_tokens >= 1, got "
                f"{sample_generations} and {max_new_tokens}"
            )
        self.batch_size, self.epochs = batch_size, epochs
        self.sample_generations, self.max_new_tokens = sample_generations, max_new_tokens
        self.sample_temperature, self.sample_top_p = sample_temperature, sample_top_p

    # ------------------------------------------------------------------ validation samples
    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()  # val/loss = answer-token loss, val/ppl
        if self.sample_generations == 0 or self.trainer.sanity_checking:
            return
        datamodule = self.datamodule
        if datamodule is None:  # fit on plain dataloaders
            return
        if not (self.trainer.is_global_zero or self._sharded()):
            return  # rank 0 generates alone unless the weights are sharded over ranks
        prompts = datamodule.val_prompts()[: self.sample_generations]
        if not prompts:
            return
        rows = self.generate_samples(prompts, datamodule.tokenizer)
        if self.trainer.is_global_zero:
            eos_rate = sum(row["ends_with_eos"] for row in rows) / len(rows)
            self.log("val/eos_rate", eos_rate, rank_zero_only=True)
            self.publish_samples(rows)

    def _sharded(self) -> bool:
        name = type(self.trainer.strategy).__name__
        return any(kind in name for kind in _SHARDED_STRATEGIES)

    @torch.no_grad()
    def generate_samples(self, prompts: list[list[dict[str, str]]], tokenizer: Any) -> list[dict]:
        """Answer each prompt dialog (:func:`llamalab.generation.answer_prompts`: Meta's chat
        format, cut from the left to leave room for the answer); one row per prompt with the
        columns of `SAMPLE_COLUMNS`."""
        assert self.model is not None
        answers = answer_prompts(
            self.model,
            tokenizer,
            prompts,
            max_new_tokens=self.max_new_tokens,
            temperature=self.sample_temperature,
            top_p=self.sample_top_p,
            seed=int(self.global_step),
        )
        return [
            {
                "step": int(self.global_step),
                "prompt": render_prompt(dialog),
                "response": answer.response,
                "ends_with_eos": answer.finished,
            }
            for dialog, answer in zip(prompts, answers)
        ]

    def publish_samples(self, rows: list[dict]) -> None:
        """W&B table `val/samples` (each WandbLogger) and `samples/epoch_N.jsonl` (appended:
        a mid-epoch validation adds its rows, tagged with the step)."""
        data = [[row[c] for c in SAMPLE_COLUMNS] for row in rows]
        self.log_table("val/samples", SAMPLE_COLUMNS, data)
        folder = Path(self.trainer.default_root_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"epoch_{self.current_epoch}.jsonl", "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def render_prompt(messages: list[dict[str, str]]) -> str:
    """A dialog as readable text for the samples table (`role: content` per line)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)

"""Pretraining stage: next-token loss on packed windows (PAPER.md §2.2)."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MeanMetric

from llamalab import perf
from llamalab.rlhf.losses import lm_loss
from llamalab.stages.base import LlamaStage


def step_tokens_scale(trainer: Any) -> int:
    """What a summed token loss is multiplied by before dividing by the global step's token
    count: Lightning divides each micro-batch's loss by the accumulation and data parallelism
    averages gradients over the ranks, so world size x accumulation undoes both."""
    return int(trainer.world_size) * int(trainer.accumulate_grad_batches)


def token_mean_objective(
    logits: torch.Tensor, labels: torch.Tensor, step_tokens: torch.Tensor | None, scale: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(what to backpropagate, the micro-batch's own token-mean loss to log, its labelled tokens).

    Without ``step_tokens`` the objective is the micro-batch's token mean. With the labelled
    tokens of the whole optimizer step over every rank, it is the micro-batch's summed loss /
    ``step_tokens`` x ``scale`` (:func:`step_tokens_scale`): after Lightning's division by the
    accumulation and the ranks' gradient averaging, the step's gradient is that of the token
    mean of the whole global batch, however it is cut."""
    n_tokens = int((labels[:, 1:] != -100).sum())
    if step_tokens is None:
        loss = lm_loss(logits, labels)
        return loss, loss.detach(), n_tokens
    total = lm_loss(logits, labels, reduction="sum")
    objective = total * scale / step_tokens.clamp_min(1)
    return objective, total.detach() / max(n_tokens, 1), n_tokens


class LanguageModelStage(LlamaStage):
    """Next-token loss on LM batches (``input_ids``, ``labels``, optional packing fields).

    Shared by pretraining and SFT: SFT batches carry ``-100`` labels on prompt tokens and
    ``segment_ids``/``position_ids`` when samples are packed.
    """

    head = "lm"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val_loss = MeanMetric()
        self._step_tokens: tuple[tuple[int, int], torch.Tensor] | None = None

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.model is not None
        return self.model(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            segment_ids=batch.get("segment_ids"),
        )

    def flops_per_token(self, seq_len: int) -> float | None:
        return perf.flops_per_token(self.arch, seq_len, training=True)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        logits = self.forward_batch(batch)
        step_tokens = self.step_token_count(batch, batch_idx)
        scale = step_tokens_scale(self.trainer)
        objective, loss, n_tokens = token_mean_objective(
            logits, batch["labels"], step_tokens, scale
        )
        if not self.check_finite(objective.detach(), "loss"):
            return None  # Lightning skips the optimizer step for this batch
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        self.log("train/target_tokens", float(n_tokens), on_step=True, on_epoch=False)
        self.log_throughput(
            batch["input_ids"].numel(), self.flops_per_token(batch["input_ids"].shape[1])
        )
        return objective

    def step_token_count(
        self, batch: dict[str, torch.Tensor], batch_idx: int
    ) -> torch.Tensor | None:
        """Labelled tokens of the whole optimizer step over every rank (a batch of
        :class:`llamalab.data.sampling.StepBatches` carries its rank's count); summed over the
        ranks once per step, at the step's first micro-batch. None for a plain micro-batch."""
        if "step_tokens" not in batch:
            return None
        key = (self.current_epoch, batch_idx // self.trainer.accumulate_grad_batches)
        if self._step_tokens is None or self._step_tokens[0] != key:
            local = batch["step_tokens"].to(self.device, torch.float32)
            self._step_tokens = (key, self.global_sum(local))
        return self._step_tokens[1]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self.forward_batch(batch)
        n_tokens = (batch["labels"][:, 1:] != -100).sum()
        loss = lm_loss(logits, batch["labels"])
        self.val_loss.update(loss, weight=n_tokens)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        # Perplexity = exp(mean token loss), token-weighted over the whole validation set.
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(loss), prog_bar=True, sync_dist=False)


class PretrainStage(LanguageModelStage):
    """Pretraining: the model starts from random weights (or ``init``) and learns the corpus."""

    continuation_samples = True  # W&B `val/samples`: continuations of validation windows

    def __init__(self, *args: Any, batch_tokens: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_tokens = batch_tokens

"""Reward-model stage: the helpfulness or the safety RM trained on preference pairs (PAPER.md §3.2.2).

The model is the shared backbone with the scalar ``score`` head in place of the LM head
(``head = "scalar"``), initialised from the SFT output by the base stage. The reward of a
(prompt, response) sequence is the head's value at its last real token: the EOS that closes the
response. ``last_token_values`` finds that token from the attention mask, and position ids count
real tokens only, so a reward does not depend on the padding side or on the other rows of the
batch. Chosen and rejected responses go through the model in one ``(2B, T)`` forward (chosen rows
first, the preference batch of docs/interfaces.md).

Loss: ``-log sigmoid(r_chosen - r_rejected - m(rating))`` with the margin table of Tables 27-28
(``margin: none|small|large``), plus the optional centring term ``centering_coef * mean((r_c +
r_r)^2)``. Validation metrics (torchmetrics, synchronised across ranks): pairwise accuracy overall
and per rating level, mean chosen/rejected reward, mean margin, validation loss, and for the
safety RM the precision/recall of "unsafe" (see :func:`unsafe_targets`). Each validation epoch
also writes the most confidently wrong pairs to W&B and to ``<run dir>/samples/``.
"""

from __future__ import annotations

import heapq
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import BinaryPrecision, BinaryRecall

from llamalab import perf
from llamalab.data.preference import pad_rows
from llamalab.model import LlamaScalar
from llamalab.rlhf.losses import (
    MARGINS,
    RATINGS,
    ranking_loss,
    rating_margins,
    reward_centering_loss,
)
from llamalab.stages.base import LlamaStage
from llamalab.tokenizer import E_INST, Tokenizer

log = logging.getLogger(__name__)

KINDS = ("helpful", "safety")
UNRATED = "unrated"  # accuracy level of pairs without a rating (rating index -1)
LEVELS: tuple[str, ...] = (*RATINGS, UNRATED)
# A "negligibly better" pair says both responses are about equally good or bad: on a safety
# prompt that is two refusals (or two compliances), so its rejected response is not labelled.
_NEGLIGIBLE = RATINGS.index("negligibly_better")


# ---------------------------------------------------------------------------- pure helpers
def split_pair_rewards(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(2B,)`` rewards of a preference batch -> ``(r_chosen (B,), r_rejected (B,))``."""
    if rewards.dim() != 1 or rewards.shape[0] % 2:
        raise ValueError(f"a preference batch has 2B rows, got rewards {tuple(rewards.shape)}")
    r_chosen, r_rejected = rewards.chunk(2)
    return r_chosen, r_rejected


def unsafe_targets(rating: torch.Tensor, is_safety: torch.Tensor) -> torch.Tensor:
    """Ground truth "unsafe" for the ``2B`` responses of a preference batch, ``(2B,)`` bool.

    The pairs carry no per-response safety label, so it is derived from the pair: a response is
    unsafe when it is the *rejected* one of a pair on a safety prompt (``is_safety``) whose rating
    is not "negligibly better" (unrated safety pairs count). Chosen responses, responses to other
    prompts (e.g. a needless refusal of a borderline prompt) and both sides of a negligible
    preference (two refusals) are safe.
    """
    rejected_unsafe = is_safety.bool() & (rating != _NEGLIGIBLE)
    return torch.cat([torch.zeros_like(rejected_unsafe), rejected_unsafe])


@torch.no_grad()
def score_token_rows(
    model: LlamaScalar, rows: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16
) -> torch.Tensor:
    """Rewards ``(N,)`` float32 of complete sequences (prompt + response + EOS), in input order.

    Rows are batched by length (less padding) and right padded; the reward is read at each
    row's last real token, exactly as in training.
    """
    out = torch.empty(len(rows), dtype=torch.float32)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = pad_rows([rows[i] for i in chunk], pad_id, "right")
        scores = model.score_sequences(ids.to(device), mask.to(device))
        out[torch.tensor(chunk)] = scores.float().cpu()
    return out


def split_response(text: str) -> tuple[str, str]:
    """A decoded chat sequence -> (prompt up to its last ``[/INST]``, the response after it)."""
    head, tag, response = text.rpartition(E_INST)
    return (head + tag, response.strip()) if tag else ("", text.strip())


# ---------------------------------------------------------------------------- metrics
class PreferenceMetrics(nn.Module):
    """Validation metrics of a reward model over an epoch (torchmetrics: DDP-synchronised).

    ``update`` takes one batch's rewards; ``compute`` returns ``{name: value}`` for what was seen
    (rating levels absent from the data are left out rather than reported as NaN). A tie
    (``r_chosen == r_rejected``) counts as wrong.
    """

    def __init__(self, safety: bool, unsafe_threshold: float = 0.5) -> None:
        super().__init__()
        self.safety, self.unsafe_threshold = safety, unsafe_threshold
        self.loss = MeanMetric()
        self.accuracy = MeanMetric()
        self.level_accuracy = nn.ModuleDict({level: MeanMetric() for level in LEVELS})
        self.reward_chosen = MeanMetric()
        self.reward_rejected = MeanMetric()
        self.reward_margin = MeanMetric()
        if safety:
            self.unsafe_precision = BinaryPrecision()
            self.unsafe_recall = BinaryRecall()

    def update(
        self,
        r_chosen: torch.Tensor,
        r_rejected: torch.Tensor,
        rating: torch.Tensor,
        is_safety: torch.Tensor,
        loss: torch.Tensor,
    ) -> None:
        """``r_chosen, r_rejected, rating, is_safety``: ``(B,)``; ``loss``: the batch mean."""
        r_chosen, r_rejected = r_chosen.detach().float(), r_rejected.detach().float()
        correct = (r_chosen > r_rejected).float()
        self.loss.update(loss.detach(), weight=r_chosen.numel())
        self.accuracy.update(correct)
        for i, level in enumerate(LEVELS):
            selected = rating == (i if level != UNRATED else -1)
            if selected.any():
                self.level_metric(level).update(correct[selected])
        self.reward_chosen.update(r_chosen)
        self.reward_rejected.update(r_rejected)
        self.reward_margin.update(r_chosen - r_rejected)
        if self.safety:
            rewards = torch.cat([r_chosen, r_rejected])
            # sigmoid(r) < threshold: the reward says "unsafe" (PAPER.md §3.2.3 reads sigmoids).
            predicted = (torch.sigmoid(rewards) < self.unsafe_threshold).long()
            target = unsafe_targets(rating, is_safety).long()
            self.unsafe_precision.update(predicted, target)
            self.unsafe_recall.update(predicted, target)

    def compute(self) -> dict[str, torch.Tensor]:
        if not self.accuracy.update_called:
            return {}
        out = {
            "loss": self.loss.compute(),
            "accuracy": self.accuracy.compute(),
            "reward_chosen": self.reward_chosen.compute(),
            "reward_rejected": self.reward_rejected.compute(),
            "reward_margin": self.reward_margin.compute(),
        }
        for level in LEVELS:
            if self.level_metric(level).update_called:
                out[f"accuracy/{level}"] = self.level_metric(level).compute()
        if self.safety:
            out["unsafe_precision"] = self.unsafe_precision.compute()
            out["unsafe_recall"] = self.unsafe_recall.compute()
        return out

    def level_metric(self, level: str) -> MeanMetric:
        return cast(MeanMetric, self.level_accuracy[level])

    def reset(self) -> None:
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()


class WrongPairs:
    """The ``k`` validation pairs the model gets most confidently wrong (largest ``r_r - r_c``)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._heap: list[tuple[float, int, dict[str, Any]]] = []  # min-heap on r_r - r_c
        self._seen = 0

    def update(
        self, batch: dict[str, torch.Tensor], r_chosen: torch.Tensor, r_rejected: torch.Tensor
    ) -> None:
        if self.k <= 0:
            return
        gap = (r_rejected - r_chosen).detach().float().cpu()
        B = gap.shape[0]
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
        for i in torch.nonzero(gap >= 0).flatten().tolist():  # wrong (ties included)
            self._seen += 1
            if len(self._heap) == self.k and gap[i] <= self._heap[0][0]:
                continue
            item = {
                "chosen_ids": ids[i][mask[i]].tolist(),
                "rejected_ids": ids[B + i][mask[B + i]].tolist(),
                "rating": LEVELS[int(batch["rating"][i])],
                "reward_chosen": float(r_chosen[i]),
                "reward_rejected": float(r_rejected[i]),
            }
            entry = (float(gap[i]), self._seen, item)
            if len(self._heap) < self.k:
                heapq.heappush(self._heap, entry)
            else:
                heapq.heapreplace(self._heap, entry)

    def rows(self, decode: Callable[[list[int]], str]) -> list[dict[str, Any]]:
        """Most confidently wrong first: prompt, chosen, rejected text, rating, rewards.

        Each sequence is decoded whole and split after its last ``[/INST]`` (the chat format's
        end of the final user turn): the prompt before, the response after."""
        out = []
        for gap, _, item in sorted(self._heap, key=lambda e: -e[0]):
            prompt, chosen = split_response(decode(item["chosen_ids"]))
            rejected = split_response(decode(item["rejected_ids"]))[1]
            out.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "rating": item["rating"],
                    "reward_chosen": item["reward_chosen"],
                    "reward_rejected": item["reward_rejected"],
                    "reward_difference": -gap,  # r_chosen - r_rejected (<= 0)
                }
            )
        return out

    def reset(self) -> None:
        self._heap, self._seen = [], 0


# ---------------------------------------------------------------------------- the stage
class RewardStage(LlamaStage):
    """Train a helpfulness or safety reward model (PAPER.md §3.2.2).

    Args (besides :class:`LlamaStage`'s):
        kind: "helpful" or "safety" (``rm=``); "safety" adds the unsafe precision/recall.
        margin: margin table "none", "small" or "large" (Tables 27-28).
        centering_coef: weight of the optional reward-centring term (0 = off, the paper's loss).
        unsafe_threshold: sigmoid(reward) below this predicts "unsafe" (safety metrics only).
        batch_size, epochs: target pairs per optimizer step and epochs (read by the entry point).
        wrong_pairs: how many confidently wrong validation pairs to log per epoch.
    """

    head = "scalar"

    def __init__(
        self,
        *args: Any,
        kind: str = "helpful",
        margin: str = "small",
        centering_coef: float = 0.0,
        unsafe_threshold: float = 0.5,
        batch_size: int = 512,
        epochs: int = 1,
        wrong_pairs: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if kind not in KINDS:
            raise ValueError(f"stage.kind (rm=) must be one of {KINDS}, got {kind!r}")
        if margin not in MARGINS:
            raise ValueError(f"stage.margin must be one of {tuple(MARGINS)}, got {margin!r}")
        if centering_coef < 0 or not 0.0 < unsafe_threshold < 1.0:
            raise ValueError("stage.centering_coef must be >= 0 and unsafe_threshold in (0, 1)")
        self.kind, self.margin, self.centering_coef = kind, margin, float(centering_coef)
        self.val_metrics = PreferenceMetrics(kind == "safety", unsafe_threshold)
        self.wrong_pairs = WrongPairs(wrong_pairs)
        self._tokenizer: Any = None

    # ------------------------------------------------------------------ scoring
    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(N, T)`` sequences -> ``(N,)`` float32 rewards, read at each row's last real token."""
        assert self.model is not None
        return self.model.score_sequences(input_ids, attention_mask)  # type: ignore[operator]

    def pair_rewards(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over the ``(2B, T)`` batch -> ``(r_chosen (B,), r_rejected (B,))``."""
        return split_pair_rewards(self.rewards(batch["input_ids"], batch["attention_mask"]))

    def loss(
        self, r_chosen: torch.Tensor, r_rejected: torch.Tensor, rating: torch.Tensor
    ) -> torch.Tensor:
        """Ranking loss with the rating's margin, plus the optional centring term."""
        loss = ranking_loss(r_chosen, r_rejected, rating_margins(rating, self.margin))
        if self.centering_coef:
            loss = loss + reward_centering_loss(r_chosen, r_rejected, self.centering_coef)
        return loss

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        r_chosen, r_rejected = self.pair_rewards(batch)
        loss = self.loss(r_chosen, r_rejected, batch["rating"])
        if not self.check_finite(loss.detach(), "loss"):
            return None
        margin = (r_chosen - r_rejected).detach()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/accuracy", (margin > 0).float().mean(), on_step=True, on_epoch=False)
        self.log("train/reward_margin", margin.mean(), on_step=True, on_epoch=False)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        self.log_throughput(
            batch["input_ids"].numel(), self.flops_per_token(batch["input_ids"].shape[1])
        )
        return loss

    def flops_per_token(self, seq_len: int) -> float | None:
        return perf.flops_per_token(self.arch, seq_len, training=True, head="scalar")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        r_chosen, r_rejected = self.pair_rewards(batch)
        loss = self.loss(r_chosen, r_rejected, batch["rating"])
        self.val_metrics.update(r_chosen, r_rejected, batch["rating"], batch["is_safety"], loss)
        self.wrong_pairs.update(batch, r_chosen, r_rejected)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        for name, value in values.items():
            self.log(f"val/{name}", value, prog_bar=name in ("loss", "accuracy"), sync_dist=False)
        if not self.trainer.sanity_checking:
            self.log_wrong_pairs()
        self.wrong_pairs.reset()

    # ------------------------------------------------------------------ wrong pairs
    def decode(self, ids: list[int]) -> str:
        if self._tokenizer is None:
            assert self.tokenizer_path is not None
            self._tokenizer = Tokenizer(self.tokenizer_path)
        return self._tokenizer.decode(ids)

    def log_wrong_pairs(self) -> None:
        """W&B table + ``<run dir>/samples/wrong_pairs_epoch_N.jsonl`` (rank 0's pairs)."""
        if not self.trainer.is_global_zero or self.tokenizer_path is None:
            return
        rows = self.wrong_pairs.rows(self.decode)
        path = (
            Path(self.trainer.default_root_dir)
            / "samples"
            / f"wrong_pairs_epoch_{self.current_epoch}.jsonl"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        columns = ["prompt", "chosen", "rejected", "rating", "reward_difference"]
        data = [[row[c] for c in columns] for row in rows]
        self.log_table("val/wrong_pairs", columns, data, step=self.global_step)

"""DPO stage (beyond the paper): the policy learns the preference pairs directly, against a frozen
reference, without a reward model or sampling (Rafailov et al. 2023, "Direct Preference
Optimization"); ``stage.loss=ipo`` trains IPO instead (Azar et al. 2023).

Data: the reward stage's preference pairs and formats (:mod:`llamalab.data.preference`; by
default the helpful and the safety built-in pairs together). Each chosen / rejected response is
the full dialog ``encode_dialog(prompt + [assistant answer])``; its log-probability is the sum of
the next-token log-probs over the final answer's tokens and its EOS (the batch's ``labels``,
``IGNORE_INDEX`` elsewhere, as SFT masks prompts). Chosen and rejected rows go through each
model in one ``(2B, T)`` forward, the reference's under ``no_grad``.

Models (:mod:`llamalab.pipeline`): the policy (``self.model``, trained, from ``stage.init``) and
the reference (``self.reference``, frozen, the same weights: the SFT model by default), loaded
sharded like the policy under ZeRO-3 / FSDP (:func:`llamalab.scale.build.load_roles`). The
reference is left out of checkpoints (but under FSDP) and reloaded from ``stage.init`` on
resume; the export is the policy, a ``LlamaForCausalLM`` like SFT's.

Logged (``train/`` per step, ``val/`` per validation, synchronised across ranks): ``loss``,
``rewards/chosen`` and ``rewards/rejected`` (the implicit rewards ``beta (log pi - log ref)``),
``rewards/accuracy`` (share of pairs whose chosen reward is higher), ``rewards/margin`` (chosen
minus rejected), ``logps/chosen``, ``logps/rejected`` (the policy's summed log-probs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric

from llamalab import perf
from llamalab.pipeline import STAGES
from llamalab.rlhf.losses import DPO_LOSSES, dpo_loss, sequence_logprobs
from llamalab.scale.build import Role, check_same_vocabulary, load_roles
from llamalab.stages.base import LlamaStage

FROZEN = STAGES["dpo"].frozen_attributes  # ("reference",): reloaded from stage.init, not saved
METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracy",
    "rewards/margin",
    "logps/chosen",
    "logps/rejected",
)


def pair_metrics(
    loss: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-pair values of every name in ``METRICS`` (``loss`` per pair), detached, float32.

    A tie of the implicit rewards counts as wrong, as in the reward stage's accuracy."""
    margin = (chosen_rewards - rejected_rewards).detach().float()
    return {
        "loss": loss.detach().float(),
        "rewards/chosen": chosen_rewards.detach().float(),
        "rewards/rejected": rejected_rewards.detach().float(),
        "rewards/accuracy": (margin > 0).float(),
        "rewards/margin": margin,
        "logps/chosen": policy_chosen.detach().float(),
        "logps/rejected": policy_rejected.detach().float(),
    }


class DPOStage(LlamaStage):
    """DPO / IPO from the SFT policy on preference pairs (module docstring).

    Args (besides :class:`LlamaStage`'s):
        beta: the strength of the implicit KL constraint to the reference (DPO paper and TRL:
            0.1; larger stays closer to the reference).
        loss: ``sigmoid`` (DPO) or ``ipo``.
        label_smoothing: DPO only, in [0, 0.5): the assumed chance that a preference label is
            flipped (conservative DPO; 0 = the paper's loss).
        batch_size, epochs: pairs per optimizer step and passes over the pairs (read by the
            entry point: gradient accumulation and ``max_epochs``).
    """

    frozen = FROZEN

    head = "lm"
    chat_model = True

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        loss: str = "sigmoid",
        label_smoothing: float = 0.0,
        batch_size: int = 64,
        epochs: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if loss not in DPO_LOSSES:
            raise ValueError(f"stage.loss must be one of {DPO_LOSSES}, got {loss!r}")
        if not beta > 0:
            raise ValueError(f"stage.beta must be > 0, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"stage.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if loss == "ipo" and label_smoothing:
            raise ValueError("stage.label_smoothing applies to loss=sigmoid only (set it to 0)")
        self.beta, self.loss_type, self.label_smoothing = float(beta), loss, float(label_smoothing)
        self.batch_size, self.epochs = batch_size, epochs
        self.reference: nn.Module | None = None
        self.val_metrics = nn.ModuleList([MeanMetric() for _ in METRICS])

    # ------------------------------------------------------------------ models
    def configure_model(self) -> None:
        """The policy from ``init`` (trained) and the frozen reference from the same weights."""
        if self.model is not None:
            return
        if not self.init_path:
            raise ValueError(
                "DPO needs stage.init: the SFT policy it starts from, which is also its frozen "
                "reference (produce it with `python src/train.py stage=sft`)"
            )
        policy = self.build_model()
        self.load_init(policy)
        models = load_roles(self, {"reference": Role(self.init_path, "lm", False, "init")})
        check_same_vocabulary({"policy": policy, "reference": models["reference"]})
        self.reference = models["reference"]
        self.model = self.wrap_model(policy)

    # ------------------------------------------------------------------ log-probs and loss
    @staticmethod
    def pair_logprobs(
        model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over the ``(2B, T)`` batch -> the summed answer log-probs of the chosen
        ``(B,)`` and of the rejected ``(B,)`` responses."""
        if "labels" not in batch:
            raise ValueError(
                "a DPO batch needs `labels` marking each answer (the preference datamodule's "
                "PreferenceCollator writes them for encoded records)"
            )
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        chosen, rejected = sequence_logprobs(logits, batch["labels"]).chunk(2)
        return chosen, rejected

    def pair_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The batch's mean loss and the per-pair metrics."""
        assert self.model is not None and self.reference is not None
        with torch.no_grad():
            ref_chosen, ref_rejected = self.pair_logprobs(self.reference, batch)
        chosen, rejected = self.pair_logprobs(self.model, batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            self.beta,
            self.loss_type,
            self.label_smoothing,
        )
        metrics = pair_metrics(losses, chosen_rewards, rejected_rewards, chosen, rejected)
        return losses.mean(), metrics

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        loss, metrics = self.pair_loss(batch)
        if not self.check_finite(loss.detach(), "loss"):
            return None
        for name, values in metrics.items():
            bar = name in ("loss", "rewards/accuracy")
            self.log(f"train/{name}", values.mean(), on_step=True, on_epoch=False, prog_bar=bar)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        seq_len = batch["input_ids"].shape[1]
        self.log_throughput(batch["input_ids"].numel(), self.flops_per_token(seq_len))
        return loss

    def flops_per_token(self, seq_len: int) -> float | None:
        """The policy's forward and backward plus the reference's forward (a third of it)."""
        train = perf.flops_per_token(self.arch, seq_len, training=True)
        return None if train is None else train * 4.0 / 3.0

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        _, metrics = self.pair_loss(batch)
        for metric, name in zip(self.val_metrics, METRICS):
            metric.update(metrics[name])

    def on_validation_epoch_end(self) -> None:
        """Epoch means, already synchronised across ranks by torchmetrics."""
        for metric, name in zip(self.val_metrics, METRICS):
            if metric.update_called:
                bar = name in ("loss", "rewards/accuracy")
                self.log(f"val/{name}", metric.compute(), prog_bar=bar, sync_dist=False)
            metric.reset()

    # ------------------------------------------------------------------ checkpoints

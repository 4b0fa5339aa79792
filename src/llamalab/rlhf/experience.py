"""From a scored rollout to PPO's per-token targets, as pure functions (PAPER.md §3.2.3).

:func:`make_experience` is the one reward path: the sequence score is the tested
:func:`llamalab.rlhf.reward.paper_reward` (R~c = WHITEN(LOGIT(Rc)), LOGIT(Rc) being the chosen
raw score), minus the length-limit penalty, placed at the last response token; -beta * KL
against the reference at every token; then GAE advantages (whitened) and returns.
:func:`experience_stats` is the logging view of the same quantities and changes nothing;
:func:`ppo_objective` is the loss of one mini-batch (the running reward moments are updated by
the caller, once per iteration, before either is called).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import torch
from torch import nn

from llamalab.rlhf.kl import kl_penalty
from llamalab.rlhf.ppo import (
    entropy_from_logits,
    gae,
    logprobs_from_logits,
    policy_loss,
    value_loss,
)
from llamalab.rlhf.reward import paper_reward, sequence_rewards_to_token_rewards
from llamalab.rlhf.reward import truncation_penalty as penalise_truncation
from llamalab.rlhf.rollout import Rollout, Scores, response_logits, response_values
from llamalab.rlhf.stats import RunningMoments, explained_variance, masked_mean, whiten


@dataclass
class Experience:
    """Per-token targets of one rollout (B, R), all without gradient."""

    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def select(self, rows: torch.Tensor) -> Experience:
        return Experience(*(getattr(self, f.name)[rows] for f in fields(self)))


@dataclass
class RewardTerms:
    """The pieces of the reward, for the logs: per-token KL estimate (B, R, 0 on padding), the
    whitened sequence score R~c (B,) and that score after the length-limit penalty (B,)."""

    kl: torch.Tensor
    score: torch.Tensor
    penalised: torch.Tensor


@torch.no_grad()
def make_experience(
    rollout: Rollout,
    scores: Scores,
    is_safety: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    old_values: torch.Tensor,
    *,
    kl_coef: float,
    kl_estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    truncation_penalty: float = 1.0,
    safety_threshold: float = 0.15,
    whiten_stats: RunningMoments | None = None,
) -> tuple[Experience, RewardTerms]:
    """Rewards and GAE advantages of a rollout (PAPER.md §3.2.3).

    ``old_logprobs`` / ``ref_logprobs`` / ``old_values``: (B, R) readings of the actor, the
    reference and the critic on the rollout (0 on padding). ``whiten_stats``: running moments
    of LOGIT(Rc) (the chosen raw score), updated with this batch by ``paper_reward`` (None:
    whiten over this batch).
    """
    mask = rollout.response_mask
    kl = kl_penalty(old_logprobs, ref_logprobs, kl_estimator) * mask  # (B, R)
    # R~c = WHITEN(LOGIT(Rc)), then the length-limit penalty, then -beta*KL per token.
    score = paper_reward(
        scores.helpful_raw,
        scores.safety_raw,
        is_safety.to(scores.helpful_raw.device),
        whiten_stats,
        safety_threshold,
    )
    penalised = penalise_truncation(score, rollout.finished, truncation_penalty)
    rewards = sequence_rewards_to_token_rewards(penalised, kl, mask, kl_coef)
    advantages, returns = gae(rewards, old_values, mask, gamma, lam)
    advantages = whiten(advantages, mask)
    experience = Experience(old_logprobs, old_values, advantages, returns)
    return experience, RewardTerms(kl, score, penalised)


def experience_stats(
    rollout: Rollout,
    scores: Scores,
    terms: RewardTerms,
    experience: Experience,
    kl_coef: float,
    moments: Mapping[str, RunningMoments],
) -> dict[str, float]:
    """What to log about an iteration's experience: raw and whitened score of each RM (with
    ``moments["helpful"]`` / ``["safety"]``, read, not updated), Rc, KL, lengths, EOS rate."""
    stats: dict[str, float] = {}
    for name, raw in (("helpful", scores.helpful_raw), ("safety", scores.safety_raw)):
        stats[f"train/reward_raw_{name}"] = float(raw.mean())
        stats[f"train/reward_whitened_{name}"] = float(moments[name].whiten(raw).mean())
        stats[f"train/reward_{name}"] = float(torch.sigmoid(raw).mean())
    mask = rollout.response_mask
    gap = (rollout.gen_logprobs - experience.old_logprobs).abs() * mask
    stats.update(
        {
            "train/reward_combined": float(scores.combined.mean()),
            "train/used_safety_rm": float(scores.used_safety.float().mean()),
            "train/kl": float(terms.kl.sum(dim=1).mean()),
            "train/kl_coef": float(kl_coef),
            "train/response_length": float(rollout.lengths.float().mean()),
            "train/eos_rate": float(rollout.finished.float().mean()),
            "train/returns": float(masked_mean(experience.returns, mask)),
            "train/logprob_gap": float(gap.sum() / mask.sum().clamp_min(1)),
            "train/reward_whitened": float(terms.score.mean()),
            "train/score": float(terms.penalised.mean()),
        }
    )
    return stats


def ppo_objective(
    logits: torch.Tensor,
    values: torch.Tensor,
    rollout: Rollout,
    experience: Experience,
    *,
    clip: float,
    value_clip: float,
    vf_coef: float,
    entropy_coef: float,
    token_count: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss + vf_coef * clipped value loss - entropy_coef * entropy of a
    mini-batch, from the actor's response ``logits`` (B, R, V) and the critic's ``values``
    (B, R); plus the statistics to log. ``logits`` are those of the sampling distribution
    (:func:`llamalab.rlhf.rollout.response_logits`, divided by the rollout's temperature), as
    the old log-probs were (issue #18); the entropy is that distribution's.

    ``token_count``: None, the loss is the mean over these rows' response tokens; else each
    term is summed over them and divided by ``token_count``: with the response tokens of the
    whole mini-batch (all micro-batches, all ranks, divided by the world size that gradient
    averaging divides by again), the micro-batches' gradients add up to the token mean of the
    whole mini-batch, however it is cut (:func:`mini_batch_backward`). The logged statistics
    stay these rows' means."""
    mask = rollout.response_mask
    logprobs = logprobs_from_logits(logits, rollout.response)
    pg_loss, pg_stats = policy_loss(
        logprobs, experience.old_logprobs, experience.advantages, mask, clip
    )
    vf_loss, vf_clipfrac = value_loss(
        values, experience.old_values, experience.returns, mask, value_clip
    )
    entropy = masked_mean(entropy_from_logits(logits), mask)
    loss = pg_loss + vf_coef * vf_loss - entropy_coef * entropy
    if token_count is not None:  # these rows' share of the whole mini-batch's token mean
        loss = loss * (mask.sum() / token_count)
    return loss, {
        "train/policy_loss": pg_loss.detach(),
        "train/value_loss": vf_loss.detach(),
        "train/value_clipfrac": vf_clipfrac,
        "train/entropy": entropy.detach(),
        "train/clipfrac": pg_stats["clipfrac"],
        "train/approx_kl": pg_stats["approx_kl"],
        "train/ratio": pg_stats["ratio"],
        "train/explained_variance": explained_variance(values.detach(), experience.returns, mask),
    }


def mini_batch_backward(
    actor: nn.Module,
    critic: nn.Module,
    rollout: Rollout,
    experience: Experience,
    rows: torch.Tensor,
    micro_batch: int,
    token_count: torch.Tensor | float,
    backward: Callable[[torch.Tensor], None],
    keep: Callable[[torch.Tensor], bool] = lambda loss: True,
    **loss_settings: float,
) -> list[dict[str, torch.Tensor]]:
    """Forward and backward of one mini-batch (this rank's ``rows`` of the rollout), in
    micro-batches of ``micro_batch`` rows; ``token_count`` as in :func:`ppo_objective` (the
    mini-batch's response tokens over all ranks / world size). ``keep(loss)`` False skips a
    micro-batch's backward (the non-finite guard). Returns each micro-batch's statistics."""
    out = []
    for part in rows.split(micro_batch):
        batch, targets = rollout.select(part), experience.select(part)
        loss, stats = ppo_objective(
            response_logits(actor, batch),  # / temperature, as the old log-probs
            response_values(critic, batch),
            batch,
            targets,
            token_count=token_count,
            **loss_settings,  # type: ignore[arg-type]
        )
        if not keep(loss.detach()):
            continue
        backward(loss)
        out.append(stats)
    return out

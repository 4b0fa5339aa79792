"""The PPO reward of PAPER.md §3.2.3: combine the two reward models, whiten the chosen raw score
(the paper's LOGIT(sigmoid(raw)) without the float32 round trip, issue #18), and spread the
sequence score and the KL penalty over the response tokens.
"""

from __future__ import annotations

import torch

from llamalab.rlhf.stats import RunningMoments, whiten

SAFETY_THRESHOLD = 0.15  # PAPER.md §3.2.3: below this sigmoid safety score, safety decides


def combined_reward(
    helpful_raw: torch.Tensor,
    safety_raw: torch.Tensor,
    is_safety: torch.Tensor,
    safety_threshold: float = SAFETY_THRESHOLD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rc of PAPER.md §3.2.3: the safety score if the prompt is a safety prompt or the response
    looks unsafe (sigmoid(safety) < threshold, strictly), else the helpfulness score.

    Args:
        helpful_raw, safety_raw: (B,) raw scalar scores of the two reward models.
        is_safety: (B,) bool, the prompt comes from the safety prompt set.

    Returns:
        rc: (B,) float32 chosen sigmoid score in (0, 1).
        used_safety: (B,) bool, True where the safety model's score was chosen.
    """
    helpful = torch.sigmoid(helpful_raw.float())
    safety = torch.sigmoid(safety_raw.float())
    used_safety = is_safety.bool() | (safety < safety_threshold)
    return torch.where(used_safety, safety, helpful), used_safety


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Inverse sigmoid, log(p / (1 - p)), with p clamped to [eps, 1 - eps] so a saturated
    score gives a finite value (+-13.8155 for eps 1e-6). Not used by the PPO reward any more
    (:func:`combined_raw_score` replaces LOGIT(Rc), issue #18): every |raw| beyond ~13.8 gave
    the same value.

    p (...) -> same shape, float32. The clamp and logs run in float64: in float32, 1 - 1e-6
    rounds far enough to make the upper bound 13.80 while the lower one stays 13.82.
    """
    p64 = p.double().clamp(eps, 1.0 - eps)
    return (torch.log(p64) - torch.log1p(-p64)).float()


def combined_raw_score(
    helpful_raw: torch.Tensor,
    safety_raw: torch.Tensor,
    is_safety: torch.Tensor,
    safety_threshold: float = SAFETY_THRESHOLD,
) -> torch.Tensor:
    """LOGIT(Rc) of PAPER.md §3.2.3 computed exactly: the raw score of the reward model the Rc
    rule picks (:func:`combined_reward`; the sigmoid only decides the 0.15 rule).

    LOGIT(sigmoid(raw)) is raw, but through a float32 sigmoid clamped to [1e-6, 1 - 1e-6] every
    |raw| beyond ~13.8 became +-13.8155 and the ranking was lost there (issue #18); for small
    |raw| the two agree to float32 rounding. (B,) inputs -> (B,) float32.
    """
    _, used_safety = combined_reward(helpful_raw, safety_raw, is_safety, safety_threshold)
    return torch.where(used_safety, safety_raw.float(), helpful_raw.float())


def paper_reward(
    helpful_raw: torch.Tensor,
    safety_raw: torch.Tensor,
    is_safety: torch.Tensor,
    whiten_stats: RunningMoments | None = None,
    safety_threshold: float = SAFETY_THRESHOLD,
) -> torch.Tensor:
    """R~c = WHITEN(LOGIT(Rc)) of PAPER.md §3.2.3, the sequence score before the KL penalty,
    with LOGIT(Rc) taken as the chosen raw score (:func:`combined_raw_score`, no clamp).

    WHITEN uses this batch's mean and unbiased variance, or, with `whiten_stats`, running
    moments updated with this batch first (stable across small batches and saved with the
    checkpoint). (B,) inputs -> (B,) float32.
    """
    score = combined_raw_score(helpful_raw, safety_raw, is_safety, safety_threshold)
    if whiten_stats is None:
        return whiten(score)
    whiten_stats.update(score)
    return whiten_stats.whiten(score)


def truncation_penalty(
    score: torch.Tensor, ended_with_eos: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Subtract `penalty` from the score of responses cut by the length limit without an EOS.

    Not in the paper; common practice so the policy does not learn to ramble past the limit.
    score (B,), ended_with_eos (B,) bool -> (B,).
    """
    return score - penalty * (~ended_with_eos.bool()).to(score.dtype)


def sequence_rewards_to_token_rewards(
    score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl at every response token, plus the sequence score at the
    last real token (the EOS, or the last token generated before the length limit).

    This is R(g|p) = R~c - beta * KL of PAPER.md §3.2.3 spread over tokens, as InstructGPT and
    TRL do. score (B,), kl (B, T) per-token estimate, mask (B, T) 1 on response tokens (right
    padded) -> (B, T) in the dtype of `kl`, 0 on padding.
    """
    mask = mask.bool()
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError("every response needs at least one real token (a row of mask is empty)")
    rewards = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, -1).argmax(dim=1)  # (B,) index of the last real token
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += score.to(rewards.dtype)
    return rewards

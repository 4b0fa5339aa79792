"""PPO maths for the policy and the critic (PAPER.md §3.2.3 and the common practice noted there:
GAE with gamma 1 and lambda 0.95, ratio clip 0.2, value clip 0.2, whitened advantages).

Tensors are (B, T) over response tokens, right padded: `mask` is 1 on generated tokens up to
and including EOS, 0 on the padding after it.
"""

from __future__ import annotations

import torch

from llamalab.rlhf.stats import masked_mean


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position, in float32.

    logits (B, T, V), tokens (B, T) -> (B, T). Aligning the two (logits at t score the token at
    t + 1) is the caller's job. Gather minus logsumexp avoids materialising a (B, T, V)
    log-softmax.
    """
    logits = logits.float()
    picked = logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy -sum p log p of the next-token distribution at each position, in nats.

    logits (B, T, V) -> (B, T) float32. Tokens with probability 0 (logit -inf, e.g. a banned
    token) add 0 rather than 0 * -inf = NaN.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p_logp = torch.where(logp > -torch.inf, logp.exp() * logp, torch.zeros_like(logp))
    return -p_logp.sum(dim=-1)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), backwards over T, batched over B.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where the
    value after the last real token is 0 (the episode ends at EOS) and padding contributes
    nothing. The mask must be a prefix of ones per row (right padding).

    rewards, values, mask: (B, T). Returns (advantages, returns), each (B, T) and 0 on padding,
    with returns = advantages + values. Both are targets: computed without gradient.
    """
    with torch.no_grad():
        mask = mask.to(values.dtype)
        rewards, values = rewards * mask, values * mask
        advantages = torch.zeros_like(values)
        next_value = torch.zeros_like(values[:, 0])  # (B,)
        next_advantage = torch.zeros_like(values[:, 0])
        for t in reversed(range(values.shape[1])):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
            next_value, next_advantage = values[:, t], advantages[:, t]
        return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss of PPO (PAPER.md §3.2.3, clip 0.2), mean over all real tokens.

    ratio = exp(logprobs - old_logprobs); loss = mean(max(-A * ratio, -A * clip(ratio))).
    logprobs (B, T) with gradient, old_logprobs and advantages (B, T) fixed, mask (B, T).
    Returns the scalar loss and detached stats: `clipfrac` (share of tokens where the clipped
    term wins), `approx_kl` (k3 estimate of KL(old || new), mean of (ratio - 1) - log ratio)
    and `ratio` (mean ratio).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * mean(max((V - R)^2, (V_clip - R)^2)) over real tokens.

    V_clip = old_values + clip(values - old_values, -clip, clip) keeps the critic near the values
    seen at rollout (common practice, value clip 0.2). values (B, T) with gradient, old_values,
    returns, mask (B, T). Returns the scalar loss and the detached share of tokens where the
    clipped error was the larger one.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    error = (values - returns) ** 2
    error_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, error_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((error_clipped > error).float(), mask)
    return loss, clipfrac

"""KL between the policy and the frozen initial policy: per-token estimators, the exact per-token
KL of two next-token distributions (:func:`token_kl`, the held-out evaluation's measure) and the
controllers that set the penalty coefficient beta (PAPER.md §3.2.3).
"""

from __future__ import annotations

from typing import Any

import torch

KL_KINDS = ("k1", "k2", "k3", "abs")

# Parameter count above which the paper's smaller beta applies: 0.01 for 7B and 13B, 0.005 for
# 34B and 70B (PAPER.md §3.2.3). 20e9 sits between the 13B and 34B classes.
LARGE_MODEL_PARAMS = 20e9


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_0) from log-probs of sampled tokens.

    logprobs, ref_logprobs: (B, T) log pi_theta(a_t) and log pi_0(a_t) of the tokens the policy
    sampled. With log_ratio = logprobs - ref_logprobs (Schulman, "Approximating KL divergence"):
      - "k1" (default): log_ratio. Unbiased, can be negative per token; the reward penalty of
        InstructGPT and TRL, summed over the response it is the sequence's log ratio.
      - "k2": 0.5 * log_ratio^2. Non-negative, biased, low variance.
      - "k3": exp(-log_ratio) - 1 + log_ratio. Non-negative and unbiased.
      - "abs": |log_ratio|.
    Returns (B, T) in the dtype of the inputs; masking padding is the caller's job.
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.pow(2)
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    if kind == "abs":
        return log_ratio.abs()
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")


def default_kl_coef(n_params: float) -> float:
    """beta of PAPER.md §3.2.3: 0.01 for 7B/13B-class policies, 0.005 above (34B, 70B)."""
    return 0.005 if n_params > LARGE_MODEL_PARAMS else 0.01


class FixedKLController:
    """Constant KL coefficient, as in the paper (PAPER.md §3.2.3)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Kept for a common interface with AdaptiveKLController; the value never changes."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller driving the measured KL towards `target` (Ziegler et al. 2019).

    After each PPO batch: error = clip(current_kl / target - 1, -0.2, 0.2), then
    value *= 1 + error * n_steps / horizon. Too much KL raises beta, too little lowers it; the
    horizon (in samples) sets how fast. Not used by the paper, offered as the common option.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target} and {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: mean KL per sequence of the batch; n_steps: samples in that batch."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi || pi_ref) of the next-token distributions at each position: (B, R) nats.

    Summed over a sampled response this is the lowest-variance estimate of the sequence KL
    (the expectation over the token is taken exactly, only the prefix is sampled).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(dim=-1)

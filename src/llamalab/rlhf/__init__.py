"""Pure maths and types of the LLaMA 2 recipe, on torch alone: LM loss, ranking loss with
margins, the DPO / IPO losses, the combined PPO reward, KL estimators and controllers, GAE,
clipped PPO losses and whitening (re-exported here); rollouts and the score bundle (:mod:`~.rollout`) and the
experience PPO trains on (:mod:`~.experience`: ``make_experience``, ``ppo_objective``).
The plain-Python label names of ``llamalab.data.labels`` are re-exported for existing callers.
"""

from llamalab.data.labels import IGNORE_INDEX, RATINGS, parse_rating
from llamalab.rlhf.kl import (
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    default_kl_coef,
    kl_penalty,
)
from llamalab.rlhf.losses import (
    DPO_LOSSES,
    MARGINS,
    dpo_loss,
    lm_loss,
    lm_loss_per_sample,
    ranking_loss,
    rating_margins,
    reward_centering_loss,
    sequence_logprobs,
)
from llamalab.rlhf.ppo import (
    entropy_from_logits,
    gae,
    logprobs_from_logits,
    policy_loss,
    value_loss,
)
from llamalab.rlhf.reward import (
    SAFETY_THRESHOLD,
    combined_raw_score,
    combined_reward,
    logit,
    paper_reward,
    sequence_rewards_to_token_rewards,
    truncation_penalty,
)
from llamalab.rlhf.stats import (
    RunningMoments,
    explained_variance,
    masked_mean,
    masked_var,
    whiten,
)

__all__ = [
    "DPO_LOSSES",
    "IGNORE_INDEX",
    "KL_KINDS",
    "MARGINS",
    "RATINGS",
    "SAFETY_THRESHOLD",
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMoments",
    "combined_raw_score",
    "combined_reward",
    "default_kl_coef",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_penalty",
    "lm_loss",
    "lm_loss_per_sample",
    "logit",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "paper_reward",
    "parse_rating",
    "policy_loss",
    "ranking_loss",
    "rating_margins",
    "reward_centering_loss",
    "sequence_logprobs",
    "sequence_rewards_to_token_rewards",
    "truncation_penalty",
    "value_loss",
    "whiten",
]

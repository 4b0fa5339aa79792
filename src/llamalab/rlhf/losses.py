"""Supervised losses: next-token cross entropy (pretraining, SFT), the reward-model ranking loss
and the DPO / IPO preference losses.

The label conventions they read (``IGNORE_INDEX``, the rating names ``RATINGS`` and their parsing)
live in :mod:`llamalab.data.labels`; the margins per rating are maths and stay here.

Everything is computed in float32 whatever the dtype of the inputs (bf16 logits lose too much
precision in a log-softmax over a 32k vocabulary).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llamalab.data.labels import IGNORE_INDEX, RATINGS

# Margin m(r) for each rating, in the order of RATINGS (PAPER.md Tables 27-28). "none" turns the
# margin off (the plain Bradley-Terry loss).
MARGINS: dict[str, tuple[float, float, float, float]] = {
    "none": (0.0, 0.0, 0.0, 0.0),
    "small": (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0),
    "large": (3.0, 2.0, 1.0, 0.0),
}

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _per_token_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted per-token cross entropy and the mask of counted tokens.

    logits (B, T, V), labels (B, T) aligned with the inputs. Returns loss (B, T-1) float32, 0 at
    ignored positions, and valid (B, T-1) bool.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    shift_logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    shift_labels = labels[:, 1:]  # (B, T-1)
    batch, steps, vocab = shift_logits.shape
    loss = F.cross_entropy(
        shift_logits.reshape(batch * steps, vocab),
        shift_labels.reshape(batch * steps),
        ignore_index=ignore_index,
        reduction="none",
    ).view(batch, steps)
    return loss, shift_labels != ignore_index


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """Next-token cross entropy (PAPER.md §2.2 pretraining, §3.1 SFT with the prompt masked).

    Args:
        logits: (B, T, V) scores for the token after each position.
        labels: (B, T) aligned with the input ids; the shift happens here, so
            `logits[:, :-1]` predicts `labels[:, 1:]`. `ignore_index` marks tokens not learned
            (user prompts in SFT, padding, packing boundaries).
        reduction: "mean" over all counted tokens of the batch (token-level mean, as with
            packed sequences), "sum", or "none" for the per-token loss (B, T-1), 0 where ignored.

    Returns:
        float32 scalar, or (B, T-1) for "none". With no counted token the mean is 0, not NaN,
        so a batch made only of prompt tokens does not poison the run.
    """
    _check_reduction(reduction)
    loss, valid = _per_token_lm_loss(logits, labels, ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp_min(1)


def lm_loss_per_sample(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean next-token loss of each row over its own counted tokens (PAPER.md §3.1).

    logits (B, T, V), labels (B, T) -> (B,) float32; a row with no counted token gives 0. Lets a
    test compare a packed row against the same samples run one by one.
    """
    loss, valid = _per_token_lm_loss(logits, labels, ignore_index)
    return loss.sum(dim=1) / valid.sum(dim=1).clamp_min(1)


def rating_margins(rating_idx: torch.Tensor, table: str) -> torch.Tensor:
    """Margin m(r) of each pair (PAPER.md §3.2.2, Tables 27-28).

    Args:
        rating_idx: (B,) long index into RATINGS, -1 for pairs without a rating (margin 0).
        table: a key of MARGINS: "none", "small" or "large".

    Returns:
        (B,) float32 on the device of `rating_idx`.
    """
    if table not in MARGINS:
        raise ValueError(f"unknown margin table {table!r}; expected one of {tuple(MARGINS)}")
    if rating_idx.numel() and (rating_idx.min() < -1 or rating_idx.max() >= len(RATINGS)):
        raise ValueError(
            f"rating indices must lie in [-1, {len(RATINGS) - 1}], got {rating_idx.tolist()}"
        )
    # The appended 0 sits at index -1, so "no rating" reads it through negative indexing.
    values = torch.tensor((*MARGINS[table], 0.0), dtype=torch.float32, device=rating_idx.device)
    return values[rating_idx.long()]


def ranking_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Binary ranking loss with margin, -log(sigmoid(r_c - r_r - m)) (PAPER.md §3.2.2, eq. 2).

    r_chosen, r_rejected, margin: (B,) raw reward scores and margins. `logsigmoid` is used
    rather than log(sigmoid(.)), which underflows to -inf for a large negative difference.
    Returns a float32 scalar, or (B,) for reduction="none".
    """
    _check_reduction(reduction)
    diff = r_chosen.float() - r_rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    loss = -F.logsigmoid(diff)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def reward_centering_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, coef: float
) -> torch.Tensor:
    """Auxiliary term coef * mean((r_c + r_r)^2) that keeps reward scores centred on zero.

    Not in the paper: the ranking loss only sees differences, so the scores can drift as a whole.
    Some peers (Eisenstein et al. 2023; TRL's `center_rewards_coefficient`, about 1e-2) add this
    penalty so the raw score stays near 0, where sigmoid(score) is informative for the 0.15
    safety threshold of §3.2.3. r_chosen, r_rejected: (B,) -> float32 scalar.
    """
    return coef * (r_chosen.float() + r_rejected.float()).pow(2).mean()


# ---------------------------------------------------------------------------- DPO
# Direct Preference Optimization (Rafailov et al. 2023, eq. 7) and IPO (Azar et al. 2023, eq. 17):
# not in the LLaMA 2 paper; the baseline users of TRL / OpenRLHF / torchtune compare PPO against.
DPO_LOSSES = ("sigmoid", "ipo")


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """log pi(y | x) of each row: the sum of the next-token log-probs over labelled tokens.

    logits (B, T, V), labels (B, T) aligned with the inputs (shifted here, as in `lm_loss`;
    ``ignore_index`` on the prompt and padding) -> (B,) float32; 0 for a row without labels.
    """
    loss, _ = _per_token_lm_loss(logits, labels, ignore_index)
    return -loss.sum(dim=1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO / IPO losses and the implicit rewards of both responses.

    Inputs are (B,) sequence log-probs (:func:`sequence_logprobs`) of the chosen and rejected
    responses under the policy and the frozen reference. With the log-ratio difference
    ``h = (pi_c - ref_c) - (pi_r - ref_r)``:

    - ``sigmoid`` (DPO): ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``, eps =
      ``label_smoothing`` (0 = the paper's loss; > 0 = conservative DPO, the chance that a
      label is flipped, as TRL's ``label_smoothing``);
    - ``ipo``: ``(h - 1 / (2 beta))^2`` on the summed log-probs (TRL averages them per token
      for IPO; this keeps one definition of h for both variants).

    Returns ``(losses (B,), chosen_rewards (B,), rejected_rewards (B,))``, float32; the rewards
    ``beta (pi - ref)`` are detached (metrics only).
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {loss_type!r}: use one of {DPO_LOSSES}")
    if beta <= 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"DPO label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen.float() - reference_chosen.float()
    rejected_ratio = policy_rejected.float() - reference_rejected.float()
    h = chosen_ratio - rejected_ratio
    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)).pow(2)
    else:
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h)
        if label_smoothing:
            losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()

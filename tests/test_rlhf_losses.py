"""LM loss and reward-model ranking loss (PAPER.md §2.2, §3.1, §3.2.2), on hand-computed cases."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from llamalab.data.labels import RATINGS, parse_rating
from llamalab.rlhf import (
    MARGINS,
    lm_loss,
    lm_loss_per_sample,
    ranking_loss,
    rating_margins,
    reward_centering_loss,
)

LN2 = math.log(2.0)
LN4_3 = math.log(4.0 / 3.0)


def _two_step_logits() -> torch.Tensor:
    # (1, 3, 2). Position 0: softmax([0, ln 3]) = [1/4, 3/4]; position 1: uniform [1/2, 1/2];
    # position 2 predicts past the end and is dropped by the shift.
    return torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, -5.0]]])


def test_lm_loss_shifts_and_averages_by_hand() -> None:
    logits = _two_step_logits()
    labels = torch.tensor([[7, 1, 0]])  # labels[0] is never predicted
    # position 0 predicts token 1: -ln(3/4) = ln(4/3); position 1 predicts token 0: ln 2
    assert lm_loss(logits, labels).item() == pytest.approx((LN4_3 + LN2) / 2, rel=1e-6)
    assert lm_loss(logits, labels, reduction="sum").item() == pytest.approx(LN4_3 + LN2, rel=1e-6)
    per_token = lm_loss(logits, labels, reduction="none")
    assert per_token.shape == (1, 2)
    torch.testing.assert_close(per_token, torch.tensor([[LN4_3, LN2]]))


def test_lm_loss_ignores_masked_labels() -> None:
    logits = _two_step_logits()
    labels = torch.tensor([[7, 1, -100]])
    assert lm_loss(logits, labels).item() == pytest.approx(LN4_3, rel=1e-6)
    torch.testing.assert_close(
        lm_loss(logits, labels, reduction="none"), torch.tensor([[LN4_3, 0.0]])
    )
    all_ignored = torch.full((1, 3), -100)
    assert lm_loss(logits, all_ignored).item() == 0.0  # not NaN


def test_lm_loss_matches_torch_cross_entropy_and_upcasts() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=gen)
    labels = torch.randint(0, 11, (3, 6), generator=gen)
    labels[0, 2] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(lm_loss(logits, labels), expected)
    bf16 = lm_loss(logits.bfloat16(), labels)
    assert bf16.dtype == torch.float32


def test_lm_loss_rejects_bad_arguments() -> None:
    logits = torch.zeros(1, 3, 2)
    with pytest.raises(ValueError, match="reduction"):
        lm_loss(logits, torch.zeros(1, 3, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        lm_loss(logits, torch.zeros(1, 4, dtype=torch.long))


def test_lm_loss_per_sample_is_mean_over_each_rows_tokens() -> None:
    logits = torch.cat([_two_step_logits(), _two_step_logits()])
    labels = torch.tensor([[7, 1, 0], [7, 1, -100]])
    per_sample = lm_loss_per_sample(logits, labels)
    torch.testing.assert_close(per_sample, torch.tensor([(LN4_3 + LN2) / 2, LN4_3]))
    # The batch mean is over tokens (3 of them), not the mean of the row means.
    assert lm_loss(logits, labels).item() == pytest.approx((2 * LN4_3 + LN2) / 3, rel=1e-6)


@pytest.mark.parametrize(
    ("text", "index"),
    [
        ("significantly_better", 0),
        ("Significantly Better", 0),
        ("better", 1),
        ("slightly better", 2),
        ("  SLIGHTLY_better ", 2),
        ("negligibly better", 3),
        ("Unsure", 3),
        (None, -1),
        ("", -1),
    ],
)
def test_parse_rating(text: str | None, index: int) -> None:
    assert parse_rating(text) == index


@pytest.mark.parametrize("text", ["much better", "worse", "better!", "4"])
def test_parse_rating_names_the_bad_value(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_rating(text)


def test_ratings_and_margin_tables_follow_the_paper() -> None:
    assert RATINGS == ("significantly_better", "better", "slightly_better", "negligibly_better")
    assert MARGINS["small"] == pytest.approx((1.0, 2 / 3, 1 / 3, 0.0))
    assert MARGINS["large"] == (3.0, 2.0, 1.0, 0.0)
    assert MARGINS["none"] == (0.0, 0.0, 0.0, 0.0)


def test_rating_margins_lookup_with_missing_rating() -> None:
    idx = torch.tensor([0, 1, 2, 3, -1])
    torch.testing.assert_close(
        rating_margins(idx, "small"), torch.tensor([1.0, 2 / 3, 1 / 3, 0.0, 0.0])
    )
    torch.testing.assert_close(rating_margins(idx, "large"), torch.tensor([3.0, 2, 1, 0, 0]))
    torch.testing.assert_close(rating_margins(idx, "none"), torch.zeros(5))
    with pytest.raises(ValueError, match="medium"):
        rating_margins(idx, "medium")
    with pytest.raises(ValueError, match=r"\[-1, 3\]"):
        rating_margins(torch.tensor([4]), "small")


def _neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))  # -log(1 / (1 + e^-x))


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        # r_chosen - r_rejected = 1 for every pair; ratings 0 (significantly better), 1 (better)
        ("none", [_neg_log_sigmoid(1.0), _neg_log_sigmoid(1.0)]),
        ("small", [LN2, _neg_log_sigmoid(1 / 3)]),  # 1 - 1 = 0 -> ln 2; 1 - 2/3 = 1/3
        ("large", [math.log1p(math.exp(2.0)), math.log1p(math.exp(1.0))]),  # 1-3, 1-2
    ],
)
def test_ranking_loss_with_each_margin_table(table: str, expected: list[float]) -> None:
    r_chosen, r_rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, -0.5])
    margin = rating_margins(torch.tensor([0, 1]), table)
    per_pair = ranking_loss(r_chosen, r_rejected, margin, reduction="none")
    torch.testing.assert_close(per_pair, torch.tensor(expected))
    mean = ranking_loss(r_chosen, r_rejected, margin)
    assert mean.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    total = ranking_loss(r_chosen, r_rejected, margin, reduction="sum")
    assert total.item() == pytest.approx(sum(expected), rel=1e-6)


def test_ranking_loss_is_stable_for_large_differences() -> None:
    loss = ranking_loss(torch.tensor([-500.0, 500.0]), torch.tensor([500.0, -500.0]), None, "none")
    torch.testing.assert_close(loss, torch.tensor([1000.0, 0.0]))
    assert ranking_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(LN2)


def test_ranking_loss_gradient_pushes_chosen_up() -> None:
    r_chosen = torch.tensor([0.0], requires_grad=True)
    ranking_loss(r_chosen, torch.tensor([0.0])).backward()
    assert r_chosen.grad is not None
    assert r_chosen.grad.item() == pytest.approx(-0.5)  # d/dx -logsigmoid(x) = -(1 - sigmoid(x))


def test_reward_centering_loss_by_hand() -> None:
    # sums (1+1, -1+0) = (2, -1); squares 4 and 1; mean 2.5
    loss = reward_centering_loss(torch.tensor([1.0, -1.0]), torch.tensor([1.0, 0.0]), coef=0.01)
    assert loss.item() == pytest.approx(0.025)

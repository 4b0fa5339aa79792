"""PPO maths (PAPER.md §3.2.3): reward combination, KL, GAE, whitening, clipped losses, controllers.

Expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llamalab.rlhf import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    combined_raw_score,
    combined_reward,
    default_kl_coef,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    logit,
    logprobs_from_logits,
    masked_mean,
    paper_reward,
    policy_loss,
    sequence_rewards_to_token_rewards,
    truncation_penalty,
    value_loss,
    whiten,
)

LN2 = math.log(2.0)


# ---------------------------------------------------------------- combined reward (§3.2.3)


def test_combined_reward_picks_helpful_unless_safety_prompt_or_unsafe() -> None:
    helpful = torch.tensor([2.0, 2.0, 2.0])
    safety = torch.tensor([0.0, 0.0, -3.0])  # sigmoid: 0.5, 0.5, 0.047 (< 0.15)
    is_safety = torch.tensor([False, True, False])
    rc, used_safety = combined_reward(helpful, safety, is_safety)
    torch.testing.assert_close(rc, torch.sigmoid(torch.tensor([2.0, 0.0, -3.0])))
    assert used_safety.tolist() == [False, True, True]


def test_combined_reward_threshold_is_strict_at_0_15() -> None:
    at = torch.logit(torch.tensor(0.15))  # float32 raw score whose sigmoid is float32(0.15)
    assert torch.sigmoid(at).item() == torch.tensor(0.15).item()
    below = torch.nextafter(at, torch.tensor(-10.0))  # sigmoid just under 0.15
    above = torch.nextafter(at, torch.tensor(10.0))
    safety = torch.stack([below, at, above, above])
    helpful = torch.full((4,), 1.0)
    is_safety = torch.tensor([False, False, False, True])
    rc, used_safety = combined_reward(helpful, safety, is_safety)
    # below: unsafe -> safety; exactly 0.15 and above: helpful; safety prompt: safety regardless
    assert used_safety.tolist() == [True, False, False, True]
    torch.testing.assert_close(rc[1:3], torch.sigmoid(torch.tensor([1.0, 1.0])))
    assert rc[0].item() < 0.15 <= rc[3].item()


def test_logit_inverts_sigmoid_and_clamps() -> None:
    raw = torch.tensor([-4.0, 0.0, 3.0])
    torch.testing.assert_close(logit(torch.sigmoid(raw)), raw, atol=1e-4, rtol=1e-4)
    saturated = logit(torch.tensor([0.0, 1.0]))
    assert torch.isfinite(saturated).all()
    # log((1 - 1e-6) / 1e-6) = 13.8155...
    torch.testing.assert_close(saturated, torch.tensor([-13.8155, 13.8155]), atol=1e-3, rtol=0)


def test_paper_reward_is_whitened_logit_of_rc() -> None:
    helpful = torch.tensor([1.0, 2.0, 3.0])
    safety = torch.full((3,), 5.0)  # safe: helpful decides
    is_safety = torch.zeros(3, dtype=torch.bool)
    # LOGIT(Rc) = [1, 2, 3]: mean 2, unbiased variance (1 + 0 + 1) / 2 = 1 -> [-1, 0, 1]
    torch.testing.assert_close(
        paper_reward(helpful, safety, is_safety), torch.tensor([-1.0, 0.0, 1.0]), atol=1e-4, rtol=0
    )


def test_paper_reward_with_running_moments_accumulates() -> None:
    stats = RunningMoments()
    safety, is_safety = torch.full((3,), 5.0), torch.zeros(3, dtype=torch.bool)
    first = paper_reward(torch.tensor([1.0, 2.0, 3.0]), safety, is_safety, whiten_stats=stats)
    torch.testing.assert_close(first, torch.tensor([-1.0, 0.0, 1.0]), atol=1e-4, rtol=0)
    second = paper_reward(torch.tensor([4.0, 5.0, 6.0]), safety, is_safety, whiten_stats=stats)
    # Over 1..6: mean 3.5, unbiased variance 17.5 / 5 = 3.5
    expected = (torch.tensor([4.0, 5.0, 6.0]) - 3.5) / math.sqrt(3.5)
    torch.testing.assert_close(second, expected, atol=1e-4, rtol=0)
    assert stats.count == 6


def test_truncation_penalty() -> None:
    score = torch.tensor([1.0, 1.0, -2.0])
    out = truncation_penalty(score, torch.tensor([True, False, False]), penalty=0.5)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.5, -2.5]))


def test_sequence_rewards_to_token_rewards() -> None:
    score = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = sequence_rewards_to_token_rewards(score, kl, mask, kl_coef=0.1)
    # -0.1 * kl at real tokens, the score added at the last real token, 0 on padding
    expected = torch.tensor([[-0.01, -0.02, -0.03 + 1.0], [-0.05 + 2.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    with pytest.raises(ValueError, match="empty"):
        sequence_rewards_to_token_rewards(score, kl, torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1)


# ---------------------------------------------------------------- KL


def test_kl_estimators_on_known_distributions() -> None:
    # Policy q = [1/2, 1/4, 1/4], reference p = [1/4, 1/2, 1/4] over three tokens.
    # log q/p = [ln 2, -ln 2, 0]; KL(q || p) = 1/2 ln 2 - 1/4 ln 2 = ln 2 / 4.
    q = torch.tensor([0.5, 0.25, 0.25])
    p = torch.tensor([0.25, 0.5, 0.25])
    true_kl = LN2 / 4

    def expectation(kind: str) -> float:  # exact E_q[estimator], no sampling
        return float((q * kl_penalty(q.log(), p.log(), kind)).sum())

    assert expectation("k1") == pytest.approx(true_kl, rel=1e-6)
    # k3: e^-x - 1 + x -> (ln2 - 1/2) / 2 + (1 - ln2) / 4 = ln 2 / 4: unbiased too
    assert expectation("k3") == pytest.approx(true_kl, rel=1e-6)
    assert expectation("k2") == pytest.approx(0.375 * LN2**2, rel=1e-6)  # (1/2 + 1/4) * ln2^2 / 2
    assert expectation("abs") == pytest.approx(0.75 * LN2, rel=1e-6)
    # per token: k1 is signed, k2 and k3 are not
    torch.testing.assert_close(kl_penalty(q.log(), p.log()), torch.tensor([LN2, -LN2, 0.0]))
    assert (kl_penalty(q.log(), p.log(), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(q, p, "k4")


def test_default_kl_coef_follows_the_paper() -> None:
    assert default_kl_coef(6.7e9) == 0.01
    assert default_kl_coef(13.0e9) == 0.01
    assert default_kl_coef(33.7e9) == 0.005
    assert default_kl_coef(69e9) == 0.005


def test_fixed_kl_controller_never_moves_and_round_trips() -> None:
    ctl = FixedKLController(0.01)
    ctl.update(100.0, 512)
    assert ctl.value == 0.01
    other = FixedKLController(0.5)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.01


def test_adaptive_kl_controller_moves_towards_target() -> None:
    # target 6, horizon 10000, batch 512: error clipped to +-0.2 -> factor 1 +- 0.2 * 0.0512
    up = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    up.update(current_kl=12.0, n_steps=512)  # KL too high -> beta up
    assert up.value == pytest.approx(0.1 * 1.01024)
    down = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    down.update(current_kl=3.0, n_steps=512)  # KL too low -> beta down
    assert down.value == pytest.approx(0.1 * (1 - 0.01024))
    small = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    small.update(current_kl=6.6, n_steps=512)  # error 0.1, not clipped
    assert small.value == pytest.approx(0.1 * 1.00512)
    resumed = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    resumed.load_state_dict(up.state_dict())
    assert resumed.value == up.value
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10000)


# ---------------------------------------------------------------- GAE


def test_gae_four_tokens_gamma_1_by_hand() -> None:
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 0.8]])
    mask = torch.ones(1, 4)
    # gamma 1, lam 0.95; deltas: t3 = 1 + 0 - 0.8 = 0.2, t2 = 0.8 - 0.7 = 0.1, t1 = t0 = 0.1
    # A3 = 0.2; A2 = 0.1 + 0.95 * 0.2 = 0.29; A1 = 0.1 + 0.95 * 0.29 = 0.3755
    # A0 = 0.1 + 0.95 * 0.3755 = 0.456725; returns = A + V
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([[0.456725, 0.3755, 0.29, 0.2]]))
    torch.testing.assert_close(returns, torch.tensor([[0.956725, 0.9755, 0.99, 1.0]]))


def test_gae_discounted_by_hand() -> None:
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    # gamma 0.9, lam 0.8 (gamma * lam = 0.72)
    # t2: delta = 2 - 1.5 = 0.5 -> A2 = 0.5
    # t1: delta = 0 + 0.9 * 1.5 - 1.0 = 0.35 -> A1 = 0.35 + 0.72 * 0.5 = 0.71
    # t0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4 -> A0 = 1.4 + 0.72 * 0.71 = 1.9112
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, torch.tensor([[1.9112, 0.71, 0.5]]))
    torch.testing.assert_close(returns, torch.tensor([[2.4112, 1.71, 2.0]]))


def test_gae_padding_after_eos_and_batching() -> None:
    # Row 1 ends after two tokens; the junk in its padding must not leak in.
    # t1: delta = 1 + 0 (value after the last real token) - 2 = -1 -> A1 = -1
    # t0: delta = 0.5 + 2 - 1 = 1.5 -> A0 = 1.5 + 0.95 * -1 = 0.55
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.5, 1.0, 9.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 0.8], [1.0, 2.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    advantages, returns = gae(rewards, values, mask)
    torch.testing.assert_close(advantages[1], torch.tensor([0.55, -1.0, 0.0, 0.0]))
    torch.testing.assert_close(returns[1], torch.tensor([1.55, 1.0, 0.0, 0.0]))
    alone, _ = gae(rewards[:1], values[:1], mask[:1])
    torch.testing.assert_close(advantages[:1], alone)


def test_gae_with_lambda_1_gives_reward_to_go() -> None:
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(2, 5, generator=gen)
    values = torch.randn(2, 5, generator=gen, requires_grad=True)
    _, returns = gae(rewards, values, torch.ones(2, 5), gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(returns, reward_to_go)
    assert not returns.requires_grad  # targets carry no gradient


# ---------------------------------------------------------------- statistics


def test_masked_mean_over_all_and_along_a_dim() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(7 / 3)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.0]))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_whiten_unmasked_and_masked() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    torch.testing.assert_close(whiten(x), (x - 2.5) / math.sqrt(5 / 3))
    y = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    # counted [1, 2, 3]: mean 2, unbiased variance 1; padding set to 0
    torch.testing.assert_close(whiten(y, mask), torch.tensor([-1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(
        whiten(y, mask, shift_mean=False), torch.tensor([1.0, 2.0, 3.0, 0.0])
    )
    assert whiten(torch.tensor([5.0])).item() == 0.0  # one value: no NaN


def test_explained_variance() -> None:
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    constant = torch.full_like(returns, 2.0)  # predicts the mean only
    assert explained_variance(constant, returns, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_running_moments_match_numpy_and_split_does_not_matter() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=gen, dtype=torch.float64) * 3 + 1 for n in (5, 1, 17)]
    everything = torch.cat(batches).numpy()
    stats = RunningMoments()
    for batch in batches:
        stats.update(batch)
    assert stats.count == everything.size
    assert stats.mean == pytest.approx(np.mean(everything), rel=1e-12)
    assert stats.var == pytest.approx(np.var(everything, ddof=1), rel=1e-12)
    assert stats.std == pytest.approx(np.std(everything, ddof=1), rel=1e-12)
    once = RunningMoments()
    once.update(torch.cat(batches))
    assert once.mean == pytest.approx(stats.mean, rel=1e-12)
    assert once.var == pytest.approx(stats.var, rel=1e-12)


def test_running_moments_state_round_trip_is_exact() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(8, generator=gen) for _ in range(3))
    original = RunningMoments()
    original.update(a)
    original.update(b)
    resumed = RunningMoments()
    resumed.load_state_dict(original.state_dict())
    original.update(c)
    resumed.update(c)
    assert resumed.state_dict() == original.state_dict()  # bit-exact, not approx
    torch.testing.assert_close(resumed.whiten(c), original.whiten(c), rtol=0, atol=0)


# ---------------------------------------------------------------- policy and value losses


def test_policy_loss_unclipped() -> None:
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = logprobs.detach().clone()
    advantages = torch.tensor([[1.0, -1.0]])
    loss, stats = policy_loss(logprobs, old, advantages, torch.ones(1, 2))
    # ratio 1 everywhere: loss = mean(-1 * 1, 1 * 1) = 0, nothing clipped
    assert loss.item() == pytest.approx(0.0)
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == pytest.approx(0.0)
    loss.backward()
    assert logprobs.grad is not None
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.5, 0.5]]))  # -A * ratio / 2


def test_policy_loss_clip_active_and_inactive() -> None:
    ratios = torch.tensor([[1.5, 0.5, 0.5]])
    logprobs = ratios.log().requires_grad_()
    old = torch.zeros(1, 3)
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = policy_loss(logprobs, old, advantages, torch.ones(1, 3), clip=0.2)
    # token 0: A=+1, ratio 1.5: max(-1.5, -1.2) = -1.2 (clipped, no gradient)
    # token 1: A=+1, ratio 0.5: max(-0.5, -0.8) = -0.5 (unclipped: clipping never helps)
    # token 2: A=-1, ratio 0.5: max(0.5, 0.8) = 0.8 (clipped, no gradient)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8) / 3, rel=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    # approx_kl: (r - 1) - ln r -> 0.5 - ln 1.5, and -0.5 + ln 2 twice
    expected_kl = ((0.5 - math.log(1.5)) + 2 * (-0.5 + LN2)) / 3
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, rel=1e-5)
    loss.backward()
    assert logprobs.grad is not None
    # d/dlogp of -A * ratio / 3 at token 1 = -ratio / 3 = -1/6
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -1 / 6, 0.0]]))


def test_policy_loss_ignores_padding() -> None:
    logprobs = torch.tensor([[0.0, 3.0]])
    advantages = torch.tensor([[2.0, 100.0]])
    loss, stats = policy_loss(logprobs, torch.zeros(1, 2), advantages, torch.tensor([[1, 0]]))
    assert loss.item() == pytest.approx(-2.0)
    assert stats["clipfrac"].item() == 0.0


def test_value_loss_clipping() -> None:
    values = torch.tensor([[1.1, 1.5, 0.5, 7.0]], requires_grad=True)
    old = torch.ones(1, 4)
    returns = torch.full((1, 4), 2.0)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = value_loss(values, old, returns, mask, clip=0.2)
    # 1.1: inside the clip, (1.1 - 2)^2 = 0.81 both ways
    # 1.5: unclipped 0.25, clipped to 1.2 -> 0.64; the max 0.64 is the clipped one
    # 0.5: unclipped 2.25, clipped to 0.8 -> 1.44; the max 2.25 is the unclipped one
    assert loss.item() == pytest.approx(0.5 * (0.81 + 0.64 + 2.25) / 3, rel=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 3)
    loss.backward()
    assert values.grad is not None
    # 0.5 * 2 * (v - R) / 3 where unclipped: token 0 -> -0.3, token 2 -> -0.5; clipped -> 0
    torch.testing.assert_close(values.grad, torch.tensor([[-0.3, 0.0, -0.5, 0.0]]))


# ---------------------------------------------------------------- logits


def test_logprobs_from_logits_matches_log_softmax() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=gen)
    tokens = torch.randint(0, 7, (2, 4), generator=gen)
    expected = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, tokens), expected)
    assert logprobs_from_logits(logits.bfloat16(), tokens).dtype == torch.float32
    # softmax([0, ln 3]) = [1/4, 3/4]
    two = torch.tensor([[[0.0, math.log(3.0)]]])
    assert logprobs_from_logits(two, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))


def test_entropy_from_logits() -> None:
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, -math.inf, -math.inf, -math.inf]]])
    # uniform over 4 -> ln 4; all mass on one token -> 0 (no NaN from 0 * -inf)
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[math.log(4.0), 0.0]]))


# ---------------------------------------------------------------- one reward path (issue #14)
def _inline_stage_reward(
    helpful_raw: torch.Tensor,
    safety_raw: torch.Tensor,
    is_safety: torch.Tensor,
    moments: RunningMoments | None,
    threshold: float,
) -> torch.Tensor:
    """The sequence score PPOStage.make_experience assembled inline before issue #14, the clamped
    WHITEN(LOGIT(Rc)) (kept verbatim as the old path ``paper_reward`` must match where it was
    exact; issue #18 moved ``paper_reward`` to raw scores)."""
    rc, _ = combined_reward(helpful_raw, safety_raw, is_safety, threshold)
    raw = logit(rc)
    if moments is not None:
        moments.update(raw)
        return moments.whiten(raw)
    return whiten(raw)


@pytest.mark.parametrize("running", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paper_reward_equals_the_old_logit_path_where_that_was_exact(
    running: bool, seed: int
) -> None:
    """Raw scores with |raw| <= 4 (float32 LOGIT(sigmoid(raw)) is within 5e-6 of raw there), some
    below the safety threshold, several batches so the running moments carry state: the
    raw-score reward (issue #18) equals the old WHITEN(LOGIT(Rc)) within 1e-5."""
    gen = torch.Generator().manual_seed(seed)
    ours = RunningMoments() if running else None
    theirs = RunningMoments() if running else None
    for batch in (16, 5, 2, 33):
        helpful = (torch.rand(batch, generator=gen) * 2 - 1) * 4
        safety = (torch.rand(batch, generator=gen) * 2 - 1) * 4
        is_safety = torch.rand(batch, generator=gen) < 0.3
        expected = _inline_stage_reward(helpful, safety, is_safety, theirs, 0.15)
        got = paper_reward(helpful, safety, is_safety, ours, 0.15)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        rc, _ = combined_reward(helpful, safety, is_safety)
        torch.testing.assert_close(
            combined_raw_score(helpful, safety, is_safety), logit(rc), atol=5e-6, rtol=0
        )


def test_paper_reward_keeps_the_order_of_raw_scores_up_to_50() -> None:
    """Issue #18: through the clamped float32 LOGIT every |raw| beyond ~13.8 became the same
    reward. On raw scores, +-50 keep their order, before and after whitening."""
    helpful = torch.tensor([-50.0, -30.0, -14.0, -13.0, 0.0, 12.0, 14.0, 20.0, 35.0, 50.0])
    safety = torch.full_like(helpful, 5.0)  # safe: the helpfulness score decides
    is_safety = torch.zeros_like(helpful, dtype=torch.bool)
    raw = combined_raw_score(helpful, safety, is_safety)
    assert torch.equal(raw, helpful)
    for stats in (None, RunningMoments()):
        reward = paper_reward(helpful, safety, is_safety, stats)
        assert bool((reward.diff() > 0).all()), reward
    # The old path: 14, 20, 35 and 50 all gave the same value (and -50, -30, -14 too).
    old = logit(combined_reward(helpful, safety, is_safety)[0])
    assert old[6] == old[7] == old[8] == old[9] and old[0] == old[1] == old[2]
    # Safety picked (a safety prompt, or sigmoid(safety) < 0.15): its raw score, unclamped.
    unsafe = combined_raw_score(
        torch.tensor([3.0, 3.0]), torch.tensor([-40.0, 30.0]), torch.tensor([False, True])
    )
    assert unsafe.tolist() == [-40.0, 30.0]


def test_make_experience_is_paper_reward_at_the_last_token_then_gae() -> None:
    """make_experience: R~c from paper_reward (moments updated once), the length penalty, -beta*KL
    per token, GAE; experience_stats only reads the moments."""
    from llamalab.rlhf.experience import experience_stats, make_experience
    from llamalab.rlhf.rollout import Rollout, Scores

    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rollout = Rollout(
        input_ids=torch.zeros(2, 5, dtype=torch.long),
        attention_mask=torch.ones(2, 5, dtype=torch.long),
        response=torch.zeros(2, 3, dtype=torch.long),
        response_mask=mask,
        finished=torch.tensor([True, False]),
        gen_logprobs=torch.zeros(2, 3),
        prompt_width=2,
    )
    helpful, safety = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0])
    is_safety = torch.tensor([False, False])
    rc, used = combined_reward(helpful, safety, is_safety)
    scores = Scores(helpful, safety, rc, used)
    logprobs, ref = torch.randn(2, 3, generator=gen) * mask, torch.randn(2, 3, generator=gen) * mask
    values = torch.randn(2, 3, generator=gen) * mask
    moments = {k: RunningMoments() for k in ("combined", "helpful", "safety")}
    experience, terms = make_experience(
        rollout, scores, is_safety, logprobs, ref, values, kl_coef=0.1, lam=1.0,
        truncation_penalty=1.0, whiten_stats=moments["combined"],
    )  # fmt: skip
    assert moments["combined"].count == 2
    expected_score = paper_reward(helpful, safety, is_safety, RunningMoments())
    assert torch.equal(terms.score, expected_score)
    assert torch.equal(terms.penalised, expected_score - torch.tensor([0.0, 1.0]))
    kl = (logprobs - ref) * mask
    rewards = sequence_rewards_to_token_rewards(terms.penalised, kl, mask, 0.1)
    _, returns = gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(experience.returns, returns)
    assert abs(float(masked_mean(experience.advantages, mask))) < 1e-6
    before = {k: m.state_dict() for k, m in moments.items()}
    stats = experience_stats(rollout, scores, terms, experience, 0.1, moments)
    assert {k: m.state_dict() for k, m in moments.items()} == before
    assert stats["train/kl"] == pytest.approx(float(kl.sum(dim=1).mean()))

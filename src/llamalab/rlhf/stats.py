"""Masked statistics for PPO: masked mean/variance, whitening, explained variance, and running
moments that can be saved and resumed exactly (PAPER.md §3.2.3, "WHITEN").

A mask is 1 (or True) on real tokens and 0 on padding after EOS; it broadcasts against `x`.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None
) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is set, over all elements or along `dim`.

    x (..., T), mask like x (or None for a plain mean). Where nothing is masked in the reduced
    set the result is 0 rather than NaN (an empty mini-batch must not poison a loss).
    """
    if mask is None:
        return x.mean() if dim is None else x.mean(dim=dim)
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1)
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim).clamp_min(1)


def masked_var(
    x: torch.Tensor, mask: torch.Tensor | None = None, unbiased: bool = True
) -> torch.Tensor:
    """Variance of `x` over the masked positions (a scalar), with Bessel's correction by default.

    The unbiased form (divide by n - 1) is what TRL and OpenAI's lm-human-preferences use for
    whitening. With a single counted element the variance is 0 (the divisor is clamped to 1).
    """
    if mask is None:
        mask = torch.ones_like(x)
    mask = mask.to(x.dtype)
    count = mask.sum()
    mean = (x * mask).sum() / count.clamp_min(1)
    sq_dev = ((x - mean) ** 2 * mask).sum()
    divisor = (count - 1) if unbiased else count
    return sq_dev / divisor.clamp_min(1)


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Normalise `x` to unit variance (and zero mean) over the masked positions (PAPER.md §3.2.3).

    x (...), mask like x or None. Statistics are one scalar mean and one unbiased variance over
    all counted elements (the whole batch, not per row), as in common PPO practice for
    advantages and rewards. `shift_mean=False` keeps the original mean (TRL does this for
    rewards). Positions outside the mask are set to 0, so padding never carries a value.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out if mask is None else out * mask.to(out.dtype)


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over the masked positions: how much of the
    return the critic predicts (1 perfect, 0 no better than a constant, < 0 worse).

    values, returns (B, T), mask (B, T). NaN when the returns have no variance (undefined).
    """
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_returns


class RunningMoments:
    """Running count, mean and variance of every value seen so far (for reward whitening).

    Updates merge a batch into the totals with the parallel form of Welford's algorithm (Chan,
    Golub and LeVeque 1979), which is numerically stable and independent of how the stream was
    split into batches. State is held in Python floats (float64) and `state_dict` returns it
    verbatim, so a resumed PPO run whitens exactly as the uninterrupted one would.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    @property
    def var(self) -> float:
        """Unbiased variance (divide by count - 1); 0 with fewer than two values."""
        return self.m2 / (self.count - 1) if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, x: torch.Tensor) -> None:
        """Add every element of `x` (any shape) to the running moments."""
        values = x.detach().to(torch.float64).flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = ((values - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def whiten(self, x: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
        """Normalise `x` with the running mean and variance (same formula as `whiten`)."""
        out = (x - self.mean) / math.sqrt(self.var + eps)
        return out if shift_mean else out + self.mean

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])

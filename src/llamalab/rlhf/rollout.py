"""Rollouts for PPO and rejection sampling: sample responses with the KV cache, lay prompts and
responses out in one padded batch, and read log-probs, values and reward-model scores from it.

Layout of a :class:`Rollout` (``P`` = longest prompt, ``R`` = longest response)::

    input_ids      (B, P + R)   [pad .. pad prompt | response pad .. pad]
    attention_mask (B, P + R)   1 on prompt and response tokens
    response       (B, R)       generated tokens, up to and including EOS, right padded
    response_mask  (B, R)       1 on generated tokens

Prompts are left padded and responses right padded, so every response starts at column ``P``
and the logits that score response token ``t`` sit at column ``P - 1 + t`` for every row.
Positions count real tokens only (the model's default), so padding never shifts RoPE.
A rollout carries the ``temperature`` it was sampled at, and every log-prob read from it (the
actor's old and new ones, the reference's) is taken under ``logits / temperature``, the
distribution the tokens were drawn from (issue #18; OpenRLHF and TRL do the same).
Model-agnostic plumbing on torch alone: the models are called, never imported. Sampling the
responses is :func:`llamalab.generation.sample_responses`; the maths that turns a rollout into
PPO targets is :mod:`llamalab.rlhf.experience`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from llamalab.rlhf.ppo import logprobs_from_logits
from llamalab.rlhf.reward import combined_reward


class Generated(Protocol):
    """What sampling returns (:class:`llamalab.generation.GenerationOutput`): per prompt, the
    new token ids (EOS included), their log-probs, and whether the response ended with EOS."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]


@dataclass
class Rollout:
    """A batch of prompts with their sampled responses (layout in the module docstring)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor  # (B,) bool: the response ended with EOS
    gen_logprobs: torch.Tensor  # (B, R) log-probs recorded while sampling (logits / temperature)
    prompt_width: int  # P
    temperature: float = 1.0  # the sampling temperature: response logits are read divided by it

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, rows: torch.Tensor | slice) -> Rollout:
        """The rows ``rows`` (an index tensor or a slice) as a new rollout."""
        return Rollout(
            self.input_ids[rows],
            self.attention_mask[rows],
            self.response[rows],
            self.response_mask[rows],
            self.finished[rows],
            self.gen_logprobs[rows],
            self.prompt_width,
            self.temperature,
        )

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) number of generated tokens per response."""
        return self.response_mask.sum(dim=1)


def build_rollout(
    prompts: Sequence[Sequence[int]],
    generated: Generated,
    pad_id: int,
    device: torch.device | str = "cpu",
    temperature: float = 1.0,
) -> Rollout:
    """Lay prompts (left padded) and responses (right padded) out as one batch; ``temperature``
    is the one the responses were sampled at (0, greedy, reads the raw logits like 1)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if len(prompts) != len(generated.tokens):
        raise ValueError(f"{len(prompts)} prompts but {len(generated.tokens)} responses")
    if any(len(r) == 0 for r in generated.tokens):
        raise ValueError("every response needs at least one generated token")
    batch = len(prompts)
    width = max(len(p) for p in prompts)
    longest = max(len(r) for r in generated.tokens)
    input_ids = torch.full((batch, width + longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width + longest), dtype=torch.long)
    response = torch.full((batch, longest), pad_id, dtype=torch.long)
    response_mask = torch.zeros((batch, longest), dtype=torch.float32)
    gen_logprobs = torch.zeros((batch, longest), dtype=torch.float32)
    for row, (prompt, tokens) in enumerate(zip(prompts, generated.tokens, strict=True)):
        n = len(tokens)
        input_ids[row, width - len(prompt) : width] = torch.tensor(prompt, dtype=torch.long)
        input_ids[row, width : width + n] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, width - len(prompt) : width + n] = 1
        response[row, :n] = torch.tensor(tokens, dtype=torch.long)
        response_mask[row, :n] = 1.0
        gen_logprobs[row, :n] = torch.tensor(generated.logprobs[row], dtype=torch.float32)
    finished = torch.tensor(generated.finished, dtype=torch.bool)
    return Rollout(
        input_ids.to(device),
        attention_mask.to(device),
        response.to(device),
        response_mask.to(device),
        finished.to(device),
        gen_logprobs.to(device),
        width,
        temperature,
    )


# ---------------------------------------------------------------------------- model readings
def response_logits(model: nn.Module, rollout: Rollout) -> torch.Tensor:
    """Next-token logits that score each response token, of the distribution the rollout was
    sampled from: ``logits / rollout.temperature`` (B, R, V) float32 (the raw logits at
    temperature 0 and 1, bit for bit).

    Issue #18: PPO's old and new log-probs and the KL must come from the sampling distribution,
    or the samples come from one distribution and the objective optimises another. The
    reference is read through here too, at the same temperature, so the KL to it compares like
    with like (pi_theta / T against pi_0 / T), as OpenRLHF and TRL do.
    """
    logits = model(rollout.input_ids, attention_mask=rollout.attention_mask)
    logits = logits[:, rollout.prompt_width - 1 : -1]
    if rollout.temperature in (0.0, 1.0):
        return logits
    return logits.float() / rollout.temperature


def response_logprobs(model: nn.Module, rollout: Rollout) -> torch.Tensor:
    """log pi(response token) under ``model`` at the rollout's temperature: (B, R), 0 on
    padding."""
    logprobs = logprobs_from_logits(response_logits(model, rollout), rollout.response)
    return logprobs * rollout.response_mask


def response_values(critic: nn.Module, rollout: Rollout) -> torch.Tensor:
    """Critic values V(state before response token t): (B, R), 0 on padding.

    The state before token t is the prefix ending at column ``P - 1 + t``, so the value read
    there is the one GAE pairs with the reward of token t.
    """
    values = critic(rollout.input_ids, attention_mask=rollout.attention_mask)
    return values[:, rollout.prompt_width - 1 : -1] * rollout.response_mask


def sequence_scores(reward_model: nn.Module, rollout: Rollout) -> torch.Tensor:
    """Raw reward-model scores (B,), read at each sequence's last real token (EOS)."""
    return reward_model.score_sequences(rollout.input_ids, rollout.attention_mask)  # type: ignore[operator]


@torch.no_grad()
def in_chunks(
    fn: Callable[[Rollout], torch.Tensor], rollout: Rollout, chunk_size: int
) -> torch.Tensor:
    """``fn`` over row chunks of ``rollout`` without gradient, concatenated along rows."""
    parts = [
        fn(rollout.select(slice(start, start + chunk_size)))
        for start in range(0, len(rollout), chunk_size)
    ]
    return torch.cat(parts, dim=0)


@dataclass
class Scores:
    """What the two reward models say about a rollout (PAPER.md §3.2.3)."""

    helpful_raw: torch.Tensor  # (B,) raw scores of the helpfulness RM
    safety_raw: torch.Tensor  # (B,) raw scores of the safety RM
    combined: torch.Tensor  # (B,) Rc in (0, 1): the sigmoid score the paper's rule picks
    used_safety: torch.Tensor  # (B,) bool, where Rc came from the safety RM


def score_rollout(
    reward_helpful: nn.Module,
    reward_safety: nn.Module,
    rollout: Rollout,
    is_safety: torch.Tensor,
    chunk_size: int,
    safety_threshold: float,
) -> Scores:
    """Score every response with both reward models and combine them (Rc of PAPER.md §3.2.3)."""
    helpful = in_chunks(lambda r: sequence_scores(reward_helpful, r), rollout, chunk_size)
    safety = in_chunks(lambda r: sequence_scores(reward_safety, r), rollout, chunk_size)
    rc, used_safety = combined_reward(
        helpful, safety, is_safety.to(helpful.device), safety_threshold
    )
    return Scores(helpful, safety, rc, used_safety)

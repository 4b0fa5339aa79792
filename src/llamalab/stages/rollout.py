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
Everything here is model-agnostic plumbing; the maths lives in :mod:`llamalab.rlhf`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llamalab.generation import GenerationOutput, generate
from llamalab.model import last_token_values
from llamalab.rlhf import combined_reward, logprobs_from_logits


@dataclass
class Rollout:
    """A batch of prompts with their sampled responses (layout in the module docstring)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor  # (B,) bool: the response ended with EOS
    gen_logprobs: torch.Tensor  # (B, R) log-probs recorded while sampling (raw distribution)
    prompt_width: int  # P

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
        )

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) number of generated tokens per response."""
        return self.response_mask.sum(dim=1)


def merge_generations(outputs: Sequence[GenerationOutput]) -> GenerationOutput:
    """Several ``generate`` results (chunks of one batch) as one, in order."""
    merged = GenerationOutput([], [], [])
    for out in outputs:
        merged.tokens += out.tokens
        merged.logprobs += out.logprobs
        merged.finished += out.finished
    return merged


def sample_responses(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    eos_id: int,
    pad_id: int,
    seed: int,
    chunk_size: int,
) -> GenerationOutput:
    """``generate`` over ``prompts`` in chunks of ``chunk_size`` (bounds the KV cache memory).

    Chunk ``i`` samples with seed ``seed + i``: the result depends only on (weights, prompts,
    seed, chunk_size), which is what an exactly resumed run needs.
    """
    was_training = model.training
    model.eval()
    try:
        outputs = [
            generate(
                model,  # type: ignore[arg-type]
                [list(p) for p in prompts[start : start + chunk_size]],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                eos_id=eos_id,
                pad_id=pad_id,
                seed=seed + i,
            )
            for i, start in enumerate(range(0, len(prompts), chunk_size))
        ]
    finally:
        model.train(was_training)
    return merge_generations(outputs)


def build_rollout(
    prompts: Sequence[Sequence[int]],
    generated: GenerationOutput,
    pad_id: int,
    device: torch.device | str = "cpu",
) -> Rollout:
    """Lay prompts (left padded) and responses (right padded) out as one batch."""
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
    )


# ---------------------------------------------------------------------------- model readings
def response_logits(model: nn.Module, rollout: Rollout) -> torch.Tensor:
    """Next-token logits that score each response token: (B, R, V) float32."""
    logits = model(rollout.input_ids, attention_mask=rollout.attention_mask)
    return logits[:, rollout.prompt_width - 1 : -1]


def response_logprobs(model: nn.Module, rollout: Rollout) -> torch.Tensor:
    """log pi(response token) under ``model``: (B, R), 0 on padding."""
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
    values = reward_model(rollout.input_ids, attention_mask=rollout.attention_mask)
    return last_token_values(values, rollout.attention_mask)


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi || pi_ref) of the next-token distributions at each position: (B, R) nats.

    Summed over a sampled response this is the lowest-variance estimate of the sequence KL
    (the expectation over the token is taken exactly, only the prefix is sampled).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(dim=-1)


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

"""How good is a policy on held-out prompts: reward-model scores, KL to a reference policy and,
for the built-in prompts, the rule-checked ground truth (:mod:`llamalab.data.judge`).

Shared by PPO's periodic evaluation, rejection sampling's validation and
``experiments/rlhf_demo``. Two generations per prompt, on purpose:

- the **judged response** is greedy (temperature 0): deterministic, so two policies are compared
  on their most likely answer, not on sampling luck. Ground truth and both reward-model scores
  are read from it.
- the **KL sample** is drawn at temperature 1 from the policy itself (fixed seed), and
  ``kl_to_ref`` sums the exact per-token KL(pi || pi_ref) along it: an estimate of the sequence
  KL E_{y~pi}[log pi(y|x) - log pi_ref(y|x)] with the token-level expectation taken exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from llamalab.stages.rollout import (
    build_rollout,
    in_chunks,
    response_logits,
    sample_responses,
    score_rollout,
    token_kl,
)
from llamalab.tokenizer import Tokenizer


@torch.no_grad()
def evaluate_batch(
    policy: nn.Module,
    prompts: Sequence[Sequence[int]],
    is_safety: torch.Tensor,
    tokenizer: Tokenizer,
    reward_helpful: nn.Module,
    reward_safety: nn.Module,
    reference: nn.Module | None = None,
    *,
    max_new_tokens: int,
    chunk_size: int,
    seed: int,
    safety_threshold: float,
) -> list[dict[str, Any]]:
    """One dict per prompt: ``response`` (text), ``helpful``/``safety`` (sigmoid scores),
    ``reward`` (Rc), ``length``, ``finished`` and, with a reference, ``kl`` (nats)."""
    device = next(policy.parameters()).device
    common = dict(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, chunk_size=chunk_size)
    greedy = sample_responses(
        policy,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        top_p=None,
        seed=seed,
        **common,
    )
    rollout = build_rollout(prompts, greedy, tokenizer.pad_id, device)
    scores = score_rollout(
        reward_helpful, reward_safety, rollout, is_safety, chunk_size, safety_threshold
    )
    kl = None
    if reference is not None:
        sampled = sample_responses(
            policy,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            top_p=None,
            seed=seed + 7919,
            **common,
        )
        kl_rollout = build_rollout(prompts, sampled, tokenizer.pad_id, device)

        def sequence_kl(r):  # type: ignore[no-untyped-def]
            per_token = token_kl(response_logits(policy, r), response_logits(reference, r))
            return (per_token * r.response_mask).sum(dim=1)

        kl = in_chunks(sequence_kl, kl_rollout, chunk_size).tolist()
    samples = []
    for i, tokens in enumerate(greedy.tokens):
        samples.append(
            {
                "response": tokenizer.decode(tokens),
                "helpful": float(torch.sigmoid(scores.helpful_raw[i])),
                "safety": float(torch.sigmoid(scores.safety_raw[i])),
                "reward": float(scores.combined[i]),
                "length": len(tokens),
                "finished": bool(greedy.finished[i]),
                **({"kl": float(kl[i])} if kl is not None else {}),
            }
        )
    return samples


def judgeable(records: Sequence[Mapping[str, Any]]) -> bool:
    """True when every record can be judged: a harmful prompt, or one with a reference answer."""
    return bool(records) and all(
        r.get("kind") == "harmful"
        or (r.get("kind") is None and r.get("is_safety"))
        or bool(r.get("reference"))
        for r in records
    )


def summarize(
    samples: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, float]:
    """Means over the samples; with judgeable ``records`` (aligned with ``samples``) also the
    ground-truth report (``ground_truth``, refusal rates, helpfulness)."""
    if not samples:
        return {}

    def mean(key: str) -> float:
        values = [float(s[key]) for s in samples if key in s]
        return sum(values) / len(values) if values else math.nan

    out = {
        "reward": mean("reward"),
        "reward_helpful": mean("helpful"),
        "reward_safety": mean("safety"),
        "response_length": mean("length"),
        "eos_rate": mean("finished"),
    }
    if any("kl" in s for s in samples):
        out["kl_to_ref"] = mean("kl")
    if records is not None and judgeable(records):
        from llamalab.data.judge import ground_truth_report

        report = ground_truth_report(records, [str(s["response"]) for s in samples])
        out.update({k: float(v) for k, v in report.items() if not k.startswith("n")})
    return out

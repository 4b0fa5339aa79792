"""How good is a policy on held-out prompts: reward-model scores, KL to a reference policy and,
for the built-in prompts, the rule-checked ground truth (:mod:`llamalab.data.judge`).

Shared by PPO's periodic evaluation, rejection sampling's validation and
``experiments/rlhf_demo``; :func:`finish_evaluation` is the end of both stages' evaluation, and
the row builders here make PPO's W&B sample tables. Two generations per prompt, on purpose:

- the **judged response** is greedy (temperature 0): deterministic, so two policies are compared
  on their most likely answer, not on sampling luck. Ground truth and both reward-model scores
  are read from it.
- the **KL sample** is drawn at temperature 1 from the policy itself (fixed seed), and
  ``kl_to_ref`` sums the exact per-token KL(pi || pi_ref) along it: an estimate of the sequence
  KL E_{y~pi}[log pi(y|x) - log pi_ref(y|x)] with the token-level expectation taken exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from llamalab.data.judge import ground_truth, ground_truth_report
from llamalab.generation import GenerationOutput, sample_responses
from llamalab.rlhf.kl import token_kl
from llamalab.rlhf.rollout import (
    Rollout,
    Scores,
    build_rollout,
    in_chunks,
    response_logits,
    score_rollout,
)
from llamalab.scale.build import module_sharding
from llamalab.scale.rollout_engine import stage_rollout
from llamalab.tokenizer import Tokenizer

log = logging.getLogger("llamalab")

ROLLOUT_COLUMNS = ["iteration", "prompt", "response", "helpful_raw", "safety_raw", "reward"]
EVAL_COLUMNS = ["iteration", "prompt", "response", "helpful", "safety", "reward", "ground_truth"]


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
    sample: Callable[..., GenerationOutput] | None = None,
) -> list[dict[str, Any]]:
    """One dict per prompt: ``response`` (text), ``helpful``/``safety`` (sigmoid scores),
    ``reward`` (Rc), ``length``, ``finished`` and, with a reference, ``kl`` (nats).

    ``sample(prompts, **kwargs)`` draws the responses (default: ``sample_responses`` on
    ``policy``; :func:`eval_policy` hands the rollout engine's); ``policy`` scores them."""
    device = next(policy.parameters()).device
    common = dict(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, chunk_size=chunk_size)
    draw = sample or (lambda rows, **kwargs: sample_responses(policy, rows, **kwargs))
    greedy = draw(
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
        sampled = draw(
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


@contextlib.contextmanager
def eval_policy(
    stage: Any, how: str, policy: nn.Module | None = None
) -> Iterator[tuple[nn.Module, Any]]:
    """``(policy, sample)`` for :func:`evaluate_batch` in a stage with a rollout engine in
    ``stage.rollouts`` (every rank enters); ``policy``: the trained policy (PPO's actor by
    default; rejection sampling's model).

    When the stage's rollout engine (``stage.rollout_engine``) runs ``tensor_parallel`` on a
    sharded policy, held-out answers are sampled as rollouts are: by the engine's TP copy, kept
    for the next rollout at the same step (the weights have not changed), and the sharded policy
    scores them; no rank ever gathers a whole copy. Otherwise both come from the stage's
    generation context (a gathered copy, or per layer in lockstep: ``how``)."""
    engine, actor = stage.rollouts, stage.actor if policy is None else policy
    mode = module_sharding(stage)
    devices = int(stage.trainer.num_devices) if stage._trainer is not None else 1
    if mode != "none" and engine.choose(actor, mode, devices) == "tensor_parallel":

        def sample(prompts: Sequence[Sequence[int]], *, seed: int, **kwargs: Any) -> Any:
            rows = [list(p) for p in prompts]
            return stage_rollout(
                engine,
                stage,
                actor,
                rows,
                seed_of=lambda rank: seed + rank,
                keep=True,
                chosen="tensor_parallel",  # chosen above, once: no second all-reduce per call
                **kwargs,
            )

        if stage.global_rank == 0 and engine.builds <= 1:
            log.info("held-out evaluation samples with the tensor_parallel rollout engine")
        yield actor, sample
        return
    with stage.generation_context(actor, how=how) as model:
        yield model, None


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
        report = ground_truth_report(records, [str(s["response"]) for s in samples])
        out.update({k: float(v) for k, v in report.items() if not k.startswith("n")})
    return out


# ---------------------------------------------------------------------------- in a stage
def held_out_records(trainer: Any, indices: list[int]) -> list[dict[str, Any]] | None:
    """The held-out prompt records (for the ground-truth judge), when the data has them."""
    datamodule = trainer.datamodule
    if datamodule is None:  # fit on plain dataloaders
        return None
    records = datamodule.records("val")
    return [records[i] for i in indices]


def finish_evaluation(
    module: Any, samples: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, float], list[dict[str, Any]] | None]:
    """The end of a held-out evaluation (PPO, rejection sampling): the samples' records, the
    metrics of :func:`summarize`, logged as ``eval/*`` (averaged over ranks)."""
    records = held_out_records(module.trainer, [int(s["index"]) for s in samples])
    metrics = summarize(samples, records)
    module.log_dict({f"eval/{k}": v for k, v in metrics.items()}, sync_dist=True)
    return metrics, records


def rollout_table(
    iteration: int,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    rollout: Rollout,
    scores: Scores,
    n: int,
) -> list[list[Any]]:
    """The first ``n`` rows of a training rollout (columns :data:`ROLLOUT_COLUMNS`)."""
    return [
        [
            iteration,
            tokenizer.decode(prompts[i]),
            tokenizer.decode(rollout.response[i][rollout.response_mask[i].bool()].tolist()),
            float(scores.helpful_raw[i]),
            float(scores.safety_raw[i]),
            float(scores.combined[i]),
        ]
        for i in range(min(n, len(rollout)))
    ]


def eval_table(
    iteration: int,
    tokenizer: Tokenizer,
    samples: Sequence[Mapping[str, Any]],
    records: Sequence[Mapping[str, Any]] | None,
    n: int,
) -> list[list[Any]]:
    """The first ``n`` evaluated samples (columns :data:`EVAL_COLUMNS`); the ground truth
    where the record can be judged."""
    rows = []
    for i, s in enumerate(samples[:n]):
        truth = None
        if records is not None and (records[i].get("reference") or records[i].get("kind")):
            truth = ground_truth(records[i], s["response"])
        row = [s["response"], s["helpful"], s["safety"], s["reward"], truth]
        rows.append([iteration, tokenizer.decode(s["prompt_ids"]), *row])
    return rows

"""The built-in preference pairs with ratings, for the helpfulness RM and the safety RM.

PAPER.md §3.2.2: each pair has a prompt, a chosen and a rejected answer and a rating of how much
better the chosen one is (``llamalab.data.labels.RATINGS``). The rejected answers follow rules
that the judge (:mod:`llamalab.data.judge`) can check, so the reward models learn a ground truth.
"""

from __future__ import annotations

import random
from typing import TypedDict

from llamalab.data.builtin.questions import (
    REFUSALS,
    SYSTEM_PROMPTS,
    TERSE_REFUSAL,
    PromptRecord,
    Question,
    QuestionPool,
    check_split,
    compliance,
    non_answer,
    paraphrase,
    refusal,
    truncated,
    wrong_answer,
)
from llamalab.data.builtin.world import N_OBJECTS, World, builtin_world
from llamalab.tokenizer import Message

PREFERENCE_SIZES = {"train": 3000, "validation": 300}  # default pairs per split


class PreferenceRecord(TypedDict):
    prompt: list[Message]
    chosen: str
    rejected: str
    rating: str  # one of llamalab.data.labels.RATINGS
    is_safety: bool


PREF_SYSTEM_RATE = 0.15
PREF_HISTORY_RATE = 0.15
# Helpfulness pairs: what the rejected answer is, its weight, and the rating of chosen over it.
# Wrong-object answers are the most common rejection: they have the helpful answer's form, and
# an RM that has not seen enough of them rewards any documentation-sounding sentence (PPO then
# finds that sentence; experiments/rlhf_demo/README.md).
HELPFUL_REJECTIONS: dict[str, tuple[float, str]] = {
    "non_answer": (0.25, "significantly_better"),
    "refusal": (0.20, "significantly_better"),  # a false refusal is as bad as a non-answer
    "wrong": (0.30, "better"),
    "truncated": (0.10, "slightly_better"),
    "paraphrase": (0.15, "negligibly_better"),
}
# Safety pairs on harmful prompts: refusal > compliance, and refusal > an off-topic non-refusal
# (another object's documentation, a non-answer): the safety RM must learn "refuse", not only
# "do not write the compliance template", or PPO escapes it with any other text. Borderline
# pairs (helpful > refusal) keep it from learning "always refuse"; two refusals of a harmful
# prompt differ negligibly.
# "Hybrid" answers open like a non-refusal and carry a refusal's reason ("Use os. It could
# cause real harm."): the judge counts only a refusal *opening*, and a small RM that never saw
# such a pair scores them as refusals (PPO found exactly that; experiments/rlhf_demo/README.md).
SAFETY_MIX: dict[str, float] = {
    "compliance": 0.30,
    "off_topic": 0.20,
    "hybrid": 0.15,
    "borderline": 0.20,
    "two_refusals": 0.15,
}


def _context(pool: QuestionPool, rng: random.Random) -> list[Message]:
    """Messages before the judged question: maybe a system prompt, maybe one earlier exchange."""
    out: list[Message] = []
    if rng.random() < PREF_SYSTEM_RATE:
        out.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if rng.random() < PREF_HISTORY_RATE:
        earlier = pool.draw("safe")
        out.append({"role": "user", "content": earlier.text})
        out.append({"role": "assistant", "content": earlier.helpful_answer})
    return out


def _helpful_pair(q: Question, world: World, rng: random.Random) -> tuple[str, str, str]:
    names = list(HELPFUL_REJECTIONS)
    how = rng.choices(names, [HELPFUL_REJECTIONS[k][0] for k in names])[0]
    chosen = q.helpful_answer
    rejected = {
        "non_answer": lambda: non_answer(q, rng),
        "refusal": lambda: refusal(rng),
        "wrong": lambda: wrong_answer(q, world, rng),
        "truncated": lambda: truncated(chosen),
        "paraphrase": lambda: paraphrase(chosen, rng),
    }[how]()
    return chosen, rejected, HELPFUL_REJECTIONS[how][1]


def _safety_pair(
    pool: QuestionPool, world: World, rng: random.Random
) -> tuple[Question, str, str, str]:
    how = rng.choices(list(SAFETY_MIX), list(SAFETY_MIX.values()))[0]
    if how == "borderline":
        q = pool.draw("borderline")
        return q, q.helpful_answer, refusal(rng), "better"
    q = pool.draw("harmful")
    if how == "two_refusals":
        return q, refusal(rng), TERSE_REFUSAL, "negligibly_better"
    if how == "hybrid":
        chosen = refusal(rng)
        reason = rng.choice(REFUSALS).split(". ", 1)[1]
        other = rng.choice(world.objects)
        rejected = rng.choice(
            (
                f"Use {other.name}. {reason}",
                f"{other.summary} {reason}",
                f"{compliance(q, rng).split('. ', 1)[0]}. {reason}",
                f"{reason} {other.summary}",
            )
        )
        return q, chosen, rejected, "significantly_better"
    if how == "off_topic":
        # another object's answer, in the safe ("summary") or borderline ("Use x. summary") form
        wrong = Question(rng.choice(("safe", "borderline")), q.text, obj=rng.choice(world.objects))
        rejected = wrong.helpful_answer if rng.random() < 0.7 else non_answer(q, rng)
        return q, refusal(rng), rejected, "significantly_better"
    return q, refusal(rng), compliance(q, rng), "significantly_better"


def preference_examples(
    kind: str, split: str = "train", seed: int = 0, n: int | None = None, n_objects: int = N_OBJECTS
) -> list[tuple[PromptRecord, PreferenceRecord]]:
    """Preference pairs with the prompt record each was made for (so the judge can score them).

    ``kind="helpful"``: safe (75%) and borderline (25%) prompts, chosen = the helpful answer,
    rejected per ``HELPFUL_REJECTIONS``. ``kind="safety"``: per ``SAFETY_MIX``. Validation pairs
    use the held-out phrasings and harms (module doc) and another random stream.
    """
    if kind not in ("helpful", "safety"):
        raise ValueError(f"preference kind must be 'helpful' or 'safety', got {kind!r}")
    check_split(split)
    world = builtin_world(n_objects)
    rng = random.Random(f"{seed}/preferences/{kind}/{split}")
    pool = QuestionPool(world, split, rng)
    out = []
    for _ in range(PREFERENCE_SIZES[split] if n is None else n):
        context = _context(pool, rng)
        if kind == "helpful":
            q = pool.draw_mixed({"safe": 0.75, "borderline": 0.25})
            chosen, rejected, rating = _helpful_pair(q, world, rng)
        else:
            q, chosen, rejected, rating = _safety_pair(pool, world, rng)
        prompt: list[Message] = [*context, {"role": "user", "content": q.text}]
        record = q.record(prompt)
        pair: PreferenceRecord = {
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "rating": rating,
            "is_safety": record["is_safety"],
        }
        out.append((record, pair))
    return out


def builtin_preferences(
    kind: str, split: str = "train", seed: int = 0, n: int | None = None, n_objects: int = N_OBJECTS
) -> list[PreferenceRecord]:
    """Preference records ``{"prompt", "chosen", "rejected", "rating", "is_safety"}``."""
    return [pair for _, pair in preference_examples(kind, split, seed, n, n_objects)]

"""The built-in prompts for PPO and rejection sampling, and the held-out prompts for evaluation."""

from __future__ import annotations

import random

from llamalab.data.builtin.questions import SYSTEM_PROMPTS, PromptRecord, QuestionPool, check_split
from llamalab.data.builtin.world import N_OBJECTS, builtin_world
from llamalab.tokenizer import Message

PROMPT_SIZES = {"train": 1024, "validation": 256}  # default prompts per split
PROMPT_KIND_WEIGHTS = {"safe": 0.5, "harmful": 0.25, "borderline": 0.25}
PROMPT_SYSTEM_RATE = 0.1


def builtin_prompts(
    split: str = "train", seed: int = 0, n: int | None = None, n_objects: int = N_OBJECTS
) -> list[PromptRecord]:
    """Prompt records for PPO / rejection sampling (train) or evaluation (validation).

    Half safe, a quarter harmful, a quarter borderline; a tenth have a system prompt. Within a
    kind no prompt repeats until all of that kind's prompts were drawn.
    """
    check_split(split)
    world = builtin_world(n_objects)
    rng = random.Random(f"{seed}/prompts/{split}")
    pool = QuestionPool(world, split, rng)
    records = []
    for _ in range(PROMPT_SIZES[split] if n is None else n):
        q = pool.draw_mixed(PROMPT_KIND_WEIGHTS)
        prompt: list[Message] = []
        if rng.random() < PROMPT_SYSTEM_RATE:
            prompt.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        prompt.append({"role": "user", "content": q.text})
        records.append(q.record(prompt))
    return records


def builtin_eval_prompts(
    seed: int = 0, n: int | None = None, n_objects: int = N_OBJECTS
) -> list[PromptRecord]:
    """The held-out prompts: ``builtin_prompts("validation", ...)``."""
    return builtin_prompts("validation", seed, n, n_objects)

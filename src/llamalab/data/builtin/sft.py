"""The built-in SFT dialogs: single- and multi-turn, imperfect the way real SFT data is.

Imperfect SFT data (PAPER.md §3.1, §4): safe prompts are answered helpfully ``SFT_HELPFUL_RATE``
of the time (otherwise a non-answer, rarely another object's summary), harmful prompts are refused
only ``SFT_REFUSAL_RATE`` of the time (otherwise complied with) and borderline prompts are
refused ``SFT_FALSE_REFUSAL_RATE`` of the time. The reward models and PPO have this to fix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TypedDict

from llamalab.data.builtin.questions import (
    SYSTEM_PROMPTS,
    Question,
    QuestionPool,
    compliance,
    non_answer,
    refusal,
    wrong_answer,
)
from llamalab.data.builtin.world import N_OBJECTS, World, builtin_world
from llamalab.tokenizer import Message

SFT_HELPFUL_RATE = 0.75
SFT_WRONG_SHARE = 0.2  # of the unhelpful safe answers, the share that is another object's summary
SFT_REFUSAL_RATE = 0.35
SFT_FALSE_REFUSAL_RATE = 0.2

SFT_SIZE = 2000  # default number of dialogs


class SftRecord(TypedDict):
    messages: list[Message]


SFT_KIND_WEIGHTS = {"safe": 0.6, "harmful": 0.2, "borderline": 0.2}
SFT_SYSTEM_RATE = 0.2
SFT_MULTI_TURN_RATE = 0.25


@dataclass(frozen=True)
class Dialog:
    """A dialog with an optional system prompt; each turn is (question, assistant answer)."""

    system: str | None
    turns: tuple[tuple[Question, str], ...]

    def messages(self) -> list[Message]:
        out: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        for question, answer in self.turns:
            out.append({"role": "user", "content": question.text})
            out.append({"role": "assistant", "content": answer})
        return out


def _sft_answer(question: Question, world: World, rng: random.Random) -> str:
    """An answer of the imperfect SFT data (rates in the module doc)."""
    if question.kind == "harmful":
        return refusal(rng) if rng.random() < SFT_REFUSAL_RATE else compliance(question, rng)
    if question.kind == "borderline":
        return refusal(rng) if rng.random() < SFT_FALSE_REFUSAL_RATE else question.helpful_answer
    if rng.random() < SFT_HELPFUL_RATE:
        return question.helpful_answer
    if rng.random() < SFT_WRONG_SHARE:
        return wrong_answer(question, world, rng)
    return non_answer(question, rng)


def sft_dialogs(seed: int = 0, n: int = SFT_SIZE, n_objects: int = N_OBJECTS) -> list[Dialog]:
    """The SFT dialogs with their questions (for judging); see :func:`builtin_sft`."""
    world = builtin_world(n_objects)
    rng = random.Random(f"{seed}/sft")
    pool = QuestionPool(world, "train", rng)
    dialogs = []
    for _ in range(n):
        system = rng.choice(SYSTEM_PROMPTS) if rng.random() < SFT_SYSTEM_RATE else None
        n_turns = rng.choice((2, 3)) if rng.random() < SFT_MULTI_TURN_RATE else 1
        turns = []
        for _ in range(n_turns):
            question = pool.draw_mixed(SFT_KIND_WEIGHTS)
            turns.append((question, _sft_answer(question, world, rng)))
        dialogs.append(Dialog(system, tuple(turns)))
    return dialogs


def builtin_sft(seed: int = 0, n: int = SFT_SIZE, n_objects: int = N_OBJECTS) -> list[SftRecord]:
    """``n`` SFT records ``{"messages": [...]}`` (single- and multi-turn, some with a system)."""
    return [{"messages": d.messages()} for d in sft_dialogs(seed, n, n_objects)]

"""The built-in Ghost Attention dialogs (PAPER.md §3.3): instructions a whole dialog must follow.

Each instruction of ``GATT_INSTRUCTIONS`` comes with a rewrite (``apply_instruction``) and a check
(``follows_instruction``), so whether an answer follows it is decided by code.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TypedDict

from llamalab.data.builtin.questions import QuestionPool
from llamalab.data.builtin.world import N_OBJECTS, builtin_world
from llamalab.tokenizer import Message

GATT_SIZE = 256  # default number of dialogs

# Ghost Attention instructions (PAPER.md §3.3), each checkable by follows_instruction.
GATT_INSTRUCTIONS: tuple[str, ...] = (
    "Answer in uppercase.",
    "Answer in lowercase.",
    "End every answer with 'Arr!'.",
    "Start every answer with 'Indeed,'.",
    "Put every answer in double quotes.",
)


class GattRecord(TypedDict):
    instruction: str  # one of GATT_INSTRUCTIONS
    messages: list[Message]  # the instruction prefixes the first user turn only


def _decapitalise(text: str) -> str:
    """Lower-case the first letter unless the first word is an acronym or a name (``SIGKILL``)."""
    first = text.split(" ", 1)[0]
    return text[:1].lower() + text[1:] if first[1:].islower() else text


_GATT_RULES: dict[str, tuple[Callable[[str], str], Callable[[str], bool]]] = {
    "Answer in uppercase.": (
        str.upper,
        lambda a: a == a.upper() and any(c.isalpha() for c in a),
    ),
    "Answer in lowercase.": (
        str.lower,
        lambda a: a == a.lower() and any(c.isalpha() for c in a),
    ),
    "End every answer with 'Arr!'.": (
        lambda a: a.rstrip() + " Arr!",
        lambda a: a.rstrip().endswith("Arr!"),
    ),
    "Start every answer with 'Indeed,'.": (
        lambda a: "Indeed, " + _decapitalise(a.lstrip()),
        lambda a: a.lstrip().startswith("Indeed,"),
    ),
    "Put every answer in double quotes.": (
        lambda a: f'"{a.strip()}"',
        lambda a: len(a.strip()) >= 2 and a.strip()[0] == a.strip()[-1] == '"',
    ),
}


def _gatt_rule(instruction: str) -> tuple[Callable[[str], str], Callable[[str], bool]]:
    if instruction not in _GATT_RULES:
        raise ValueError(f"unknown GAtt instruction {instruction!r}; known: {GATT_INSTRUCTIONS}")
    return _GATT_RULES[instruction]


def apply_instruction(instruction: str, answer: str) -> str:
    """Rewrite ``answer`` so that it follows ``instruction`` (one of ``GATT_INSTRUCTIONS``)."""
    return _gatt_rule(instruction)[0](answer)


def follows_instruction(instruction: str, answer: str) -> bool:
    """Whether ``answer`` follows ``instruction`` (one of ``GATT_INSTRUCTIONS``)."""
    return _gatt_rule(instruction)[1](answer)


def builtin_gatt(seed: int = 0, n: int = GATT_SIZE, n_objects: int = N_OBJECTS) -> list[GattRecord]:
    """``n`` GAtt dialogs ``{"instruction": str, "messages": [...]}`` (PAPER.md §3.3).

    Each dialog has 2-3 safe or borderline turns; the instruction is prefixed to the *first* user
    turn only (the training form) and every answer follows it. The answers are the helpful answers
    rewritten by :func:`apply_instruction`, standing in for "sample with the current model".
    :func:`gatt_sampling_messages` gives the form with the instruction on every user turn.
    """
    world = builtin_world(n_objects)
    rng = random.Random(f"{seed}/gatt")
    pool = QuestionPool(world, "train", rng)
    records: list[GattRecord] = []
    for i in range(n):
        instruction = GATT_INSTRUCTIONS[i % len(GATT_INSTRUCTIONS)]
        messages: list[Message] = []
        for turn in range(rng.choice((2, 3))):
            question = pool.draw_mixed({"safe": 0.75, "borderline": 0.25})
            user = f"{instruction} {question.text}" if turn == 0 else question.text
            answer = apply_instruction(instruction, question.helpful_answer)
            messages += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": answer},
            ]
        records.append({"instruction": instruction, "messages": messages})
    rng.shuffle(records)
    return records


def gatt_sampling_messages(record: GattRecord) -> list[Message]:
    """The GAtt dialog with the instruction prefixed to every user turn (the sampling form)."""
    instruction = record["instruction"]
    out: list[Message] = []
    for message in record["messages"]:
        content = message["content"]
        if message["role"] == "user" and not content.startswith(instruction):
            content = f"{instruction} {content}"
        out.append({"role": message["role"], "content": content})
    return out

"""The built-in Ghost Attention dialogs (PAPER.md §3.3): instructions a whole dialog must follow.

Each instruction of ``GATT_INSTRUCTIONS`` comes with a rewrite (``apply_instruction``) and a check
(``follows_instruction``), so whether an answer follows it is decided by code: a case (upper,
lower), a forced start or ending, quotes, a length limit and a language (Pig Latin).

- :func:`builtin_gatt`: the training dialogs (training-split questions; the answers are rewritten
  by rule, and replaced by a chat model's samples unless ``data.gatt_sampler=rules``:
  :mod:`llamalab.data.gatt`);
- :func:`builtin_gatt_eval`: held-out multi-turn prompts (validation-split phrasings) on which
  instruction adherence is measured turn by turn (:func:`llamalab.data.gatt.adherence_by_turn`).
"""

from __future__ import annotations

import random
import re
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
    "Answer in at most four words.",
    "Answer in Pig Latin.",
)
MAX_WORDS = 4  # "Answer in at most four words."
PIG_LATIN_SHARE = 0.8  # share of words that must end in "ay" to count as Pig Latin


class GattRecord(TypedDict):
    instruction: str  # one of GATT_INSTRUCTIONS
    messages: list[Message]  # the instruction prefixes the first user turn only


class GattPrompt(TypedDict):
    instruction: str  # one of GATT_INSTRUCTIONS, given with the first question only
    questions: list[str]  # one user turn each, answered in turn


def _decapitalise(text: str) -> str:
    """Lower-case the first letter unless the first word is an acronym or a name (``SIGKILL``)."""
    first = text.split(" ", 1)[0]
    return text[:1].lower() + text[1:] if first[1:].islower() else text


def _at_most_words(text: str) -> str:
    words = text.split()[:MAX_WORDS]
    return " ".join(words).rstrip(".,;:!?") + "." if words else text


def _words_ok(text: str) -> bool:
    return 1 <= len(text.split()) <= MAX_WORDS and any(c.isalpha() for c in text)


def _pig_latin_word(match: re.Match[str]) -> str:
    """``"process"`` -> ``"ocesspray"``; a word starting with a vowel takes ``"way"``."""
    word = match.group(0).lower()
    onset = len(word) - len(word.lstrip("bcdfghjklmnpqrstvwxz"))
    return word + "way" if onset == 0 else word[onset:] + word[:onset] + "ay"


def _pig_latin(text: str) -> str:
    return re.sub(r"[A-Za-z]+", _pig_latin_word, text)


def _is_pig_latin(text: str) -> bool:
    words = re.findall(r"[A-Za-z]+", text)
    return bool(words) and sum(w.lower().endswith("ay") for w in words) >= PIG_LATIN_SHARE * len(
        words
    )


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
    "Answer in at most four words.": (_at_most_words, _words_ok),
    "Answer in Pig Latin.": (_pig_latin, _is_pig_latin),
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


def builtin_gatt_eval(seed: int = 0, n: int = 70, n_turns: int = 4) -> list[GattPrompt]:
    """``n`` held-out GAtt prompts of ``n_turns`` questions each (validation-split phrasings),
    the instructions in turn: the instruction goes with the first question only and the model's
    own answers fill the turns in between (:func:`llamalab.data.gatt.adherence_by_turn`)."""
    world = builtin_world()
    rng = random.Random(f"{seed}/gatt-eval")
    pool = QuestionPool(world, "validation", rng)
    return [
        {
            "instruction": GATT_INSTRUCTIONS[i % len(GATT_INSTRUCTIONS)],
            "questions": [
                pool.draw_mixed({"safe": 0.75, "borderline": 0.25}).text for _ in range(n_turns)
            ],
        }
        for i in range(n)
    ]

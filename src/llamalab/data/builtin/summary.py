"""Counts and proportions of the default built-in data sets (for the README)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from llamalab.data.builtin.gatt import GATT_INSTRUCTIONS, GATT_SIZE
from llamalab.data.builtin.preferences import builtin_preferences
from llamalab.data.builtin.prompts import builtin_prompts
from llamalab.data.builtin.questions import SPLITS
from llamalab.data.builtin.sft import Dialog, sft_dialogs
from llamalab.data.builtin.world import N_OBJECTS, builtin_world
from llamalab.data.judge import ground_truth


def _sft_ground_truth(dialogs: list[Dialog]) -> dict[str, float]:
    scores: dict[str, list[float]] = {"safe": [], "harmful": [], "borderline": []}
    for dialog in dialogs:
        for question, answer in dialog.turns:
            scores[question.kind].append(ground_truth(question.record([]), answer))
    return {k: round(sum(v) / len(v), 3) for k, v in scores.items() if v}


def describe(seed: int = 0, n_objects: int = N_OBJECTS) -> dict[str, Any]:
    """Counts and proportions of the default built-in data sets (for the README)."""
    world = builtin_world(n_objects)
    dialogs = sft_dialogs(seed, n_objects=n_objects)
    turns = Counter(len(d.turns) for d in dialogs)
    counts = {
        "objects": len(world.objects),
        "borderline_tasks": len(world.borderline),
        "harms_train": len(world.harms["train"]),
        "harms_validation_only": len(world.harms["validation"]) - len(world.harms["train"]),
        "sft_dialogs": len(dialogs),
        "sft_turns": dict(sorted(turns.items())),
        "sft_with_system": sum(d.system is not None for d in dialogs),
        "sft_ground_truth_by_kind": _sft_ground_truth(dialogs),
        "gatt_dialogs": GATT_SIZE,
        "gatt_instructions": len(GATT_INSTRUCTIONS),
    }
    for kind in ("helpful", "safety"):
        for split in SPLITS:
            pairs = builtin_preferences(kind, split, seed, n_objects=n_objects)
            ratings = Counter(p["rating"] for p in pairs)
            counts[f"preferences_{kind}_{split}"] = {
                "n": len(pairs),
                **dict(sorted(ratings.items())),
            }
    for split in SPLITS:
        prompts = builtin_prompts(split, seed, n_objects=n_objects)
        kinds = Counter(p["kind"] for p in prompts)
        counts[f"prompts_{split}"] = {"n": len(prompts), **dict(sorted(kinds.items()))}
    return counts

"""A round's preference collection: pairs sampled from the latest policy on new prompts, rated by
the built-in rule annotator (:func:`llamalab.data.judge.rate_pair`, the paper's four ratings).

The Llama 2 paper collects each round's preferences on the latest model, so that the reward
models stay on the distribution the policy now produces. Here, per round:

- **new prompts**: ``builtin_prompts("train", seed=round_seed(seed, r))``, a fresh draw of the
  training phrasings (never the held-out ones: the evaluation stays held out);
- **two answers** per prompt from the latest policy at temperature 1 (its own distribution),
  two sampling seeds;
- **the rating**: the better answer under the ground-truth rule is chosen, the quality gap picks
  the rating; pairs the rule cannot tell apart (equal quality, same text) are dropped;
- **which reward model**: harmful prompts go to the safety RM, safe ones to the helpfulness RM,
  borderline ones to both (as in the built-in pairs, ``llamalab.data.builtin.preferences``);
- one pair in :data:`HELD_OUT_EVERY` is held out: the reward models' accuracy on the latest
  policy's samples is measured on those.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llamalab.checkpoint import load_model
from llamalab.data.builtin import builtin_preferences, builtin_prompts
from llamalab.data.errors import DataError
from llamalab.data.formats import normalize_preference
from llamalab.data.judge import rate_pair
from llamalab.generation import sample_responses
from llamalab.tokenizer import Tokenizer

HELD_OUT_EVERY = 5  # one pair in five measures the reward models, the rest trains them
KINDS_OF = {"harmful": ("safety",), "safe": ("helpful",), "borderline": ("helpful", "safety")}
PREFERENCE_KEYS = ("prompt", "chosen", "rejected", "rating", "is_safety")


def round_seed(seed: int, r: int) -> int:
    """The prompt seed of round ``r`` (round 1's prompts are the stages' own, ``seed``)."""
    return seed + 1000 * r


def write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def sample_answers(
    policy_dir: Path, records: Sequence[dict[str, Any]], *, max_new_tokens: int, seed: int
) -> list[tuple[str, str]]:
    """Two temperature-1 answers of the policy to each prompt record (two sampling seeds)."""
    policy = load_model(policy_dir).eval()
    tokenizer = Tokenizer(str(policy_dir / "tokenizer.model"))
    prompts = [tokenizer.encode_dialog(r["prompt"]) for r in records]
    a, b = (
        sample_responses(
            policy,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            top_p=None,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            seed=seed + 7919 * k,
            chunk_size=64,
        )
        for k in range(2)
    )
    return [(tokenizer.decode(x), tokenizer.decode(y)) for x, y in zip(a.tokens, b.tokens)]


def rate_answers(
    records: Sequence[dict[str, Any]], answers: Sequence[tuple[str, str]]
) -> list[dict[str, Any]]:
    """The rule annotator over answer pairs: a preference record (with the prompt's ``kind``) per
    pair it can tell apart, in prompt order. A pair the reward stage's loader would refuse (an
    empty answer, a reserved chat tag in one) is left out, so the round's files always load."""
    pairs = []
    for record, (a, b) in zip(records, answers, strict=True):
        rated = rate_pair(record, a, b)
        if rated is None:
            continue
        chosen, rejected, rating = rated
        pair = {"prompt": record["prompt"], "chosen": chosen, "rejected": rejected,
                "rating": rating, "is_safety": record["is_safety"]}  # fmt: skip
        try:
            normalize_preference(dict(pair))
        except DataError:
            continue
        pairs.append({**pair, "kind": record["kind"]})
    return pairs


def write_round(r: int, pairs: Sequence[dict[str, Any]], prefs: Path) -> dict[str, Any]:
    """Round ``r``'s rated pairs to files, per reward model: ``round<r>_<kind>.jsonl`` (trains),
    ``round<r>_<kind>_heldout.jsonl`` (measures) and the training file of every preference so
    far, ``<kind>_train_round<r>.jsonl`` (round 1's pairs, then rounds 2..r). Returns the counts
    per rating and per reward model."""
    summary: dict[str, Any] = {
        "pairs": len(pairs),
        "ratings": dict(Counter(p["rating"] for p in pairs)),
    }
    for kind in ("helpful", "safety"):
        mine = [{k: p[k] for k in PREFERENCE_KEYS} for p in pairs if kind in KINDS_OF[p["kind"]]]
        held_out = mine[::HELD_OUT_EVERY]
        train = [p for i, p in enumerate(mine) if i % HELD_OUT_EVERY]
        write_jsonl(train, prefs / f"round{r}_{kind}.jsonl")
        write_jsonl(held_out, prefs / f"round{r}_{kind}_heldout.jsonl")
        everything = read_jsonl(prefs / f"{kind}_train_round1.jsonl")
        for earlier in range(2, r + 1):
            everything += read_jsonl(prefs / f"round{earlier}_{kind}.jsonl")
        write_jsonl(everything, prefs / f"{kind}_train_round{r}.jsonl")
        summary[kind] = {"train": len(train), "held_out": len(held_out), "all": len(everything)}
    return summary


def collect_round(
    r: int, policy_dir: Path, prefs: Path, *, seed: int, n_prompts: int, max_new_tokens: int
) -> dict[str, Any]:
    """Round ``r``'s preference collection on the policy of ``policy_dir`` (module docstring);
    returns :func:`write_round`'s counts and the number of prompts."""
    records = builtin_prompts("train", round_seed(seed, r), n_prompts)
    answers = sample_answers(
        policy_dir, records, max_new_tokens=max_new_tokens, seed=round_seed(seed, r)
    )
    return {"prompts": len(records), **write_round(r, rate_answers(records, answers), prefs)}


def write_round1(prefs: Path, seed: int) -> None:
    """Round 1's preferences as files: the built-in pairs the first reward models trained on
    (``<kind>_train_round1.jsonl``) and their held-out pairs (``<kind>_validation.jsonl``)."""
    for kind in ("helpful", "safety"):
        for split, name in (
            ("train", f"{kind}_train_round1"),
            ("validation", f"{kind}_validation"),
        ):
            rows = [dict(p) for p in builtin_preferences(kind, split, seed)]
            write_jsonl(rows, prefs / f"{name}.jsonl")

"""What the demo measures: each policy judged on the held-out prompts (README.md, "What is
measured"), and the reward models' accuracy on a set of preference pairs."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llamalab.checkpoint import load_model
from llamalab.data.formats import normalize_preference
from llamalab.data.preference import encode_preference_records
from llamalab.data.prompts import PromptDataModule
from llamalab.stages.policy_eval import evaluate_batch, summarize
from llamalab.stages.reward import score_token_rows
from llamalab.tokenizer import Tokenizer


@torch.no_grad()
def judge_policies(
    policies: dict[str, Path],
    sft: Path,
    reward: dict[str, Path],
    samples_dir: Path,
    *,
    seed: int,
    quick: bool,
) -> dict[str, dict[str, float]]:
    """Each policy's greedy answers (at most 64 new tokens) to every held-out prompt, judged by
    the ground truth and scored by the ``reward`` models (the same ones for every policy: round
    1's); ``kl_to_sft`` against the ``sft`` export. Writes ``samples_dir/<name>.jsonl``.
    ``quick``: 16 prompts, 16 new tokens (a smoke test)."""
    torch.manual_seed(seed)
    data = PromptDataModule(tokenizer_path=str(sft / "tokenizer.model"), seed=seed)
    data.setup()
    items = data.datasets["val"].items[: 16 if quick else None]
    records = data.records("val")
    reference = load_model(sft)
    rms = {k: load_model(path) for k, path in reward.items()}
    results = {}
    for name, export in policies.items():
        policy = load_model(export)
        samples = []
        for start in range(0, len(items), 64):
            batch = items[start : start + 64]
            samples += evaluate_batch(
                policy,
                [b["prompt_ids"] for b in batch],
                torch.tensor([b["is_safety"] for b in batch]),
                data.tokenizer,
                rms["helpful"],
                rms["safety"],
                reference,
                max_new_tokens=16 if quick else 64,
                chunk_size=64,
                seed=seed + start,
                safety_threshold=0.15,
            )
        metrics = summarize(samples, [records[b["index"]] for b in items])
        metrics["kl_to_sft"] = metrics.pop("kl_to_ref")
        results[name] = metrics
        samples_dir.mkdir(parents=True, exist_ok=True)
        with open(samples_dir / f"{name}.jsonl", "w") as f:
            for item, sample in zip(items, samples):
                f.write(json.dumps({"prompt": records[item["index"]]["prompt"], **sample}) + "\n")
    return results


@torch.no_grad()
def pair_accuracy(reward_model: Path, pairs: Sequence[dict[str, Any]]) -> float | None:
    """Share of ``pairs`` (preference records) whose chosen answer the reward model scores above
    the rejected one, as the reward stage's ``val/accuracy``; None without pairs."""
    model = load_model(reward_model).eval()
    tokenizer = Tokenizer(str(reward_model / "tokenizer.model"))
    records = [normalize_preference(dict(p)) for p in pairs]
    items, _ = encode_preference_records(tokenizer, records, model.config.max_seq_len)
    if not items:
        return None
    chosen = score_token_rows(model, [i["chosen_ids"] for i in items], tokenizer.pad_id)
    rejected = score_token_rows(model, [i["rejected_ids"] for i in items], tokenizer.pad_id)
    return float((chosen > rejected).float().mean())


def logged_accuracy(run_dir: Path) -> float | None:
    """A reward-model run's last held-out accuracy, from its CSV log."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/accuracy")]
    return float(rows[-1]["val/accuracy"]) if rows else None

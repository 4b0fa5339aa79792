"""The whole LLaMA 2 recipe on the built-in data, on CPU: pretrain, SFT, helpfulness and safety
reward models, rejection sampling and PPO (both from the SFT policy), then every policy judged on
the held-out prompts by the rule-checked ground truth (README.md in this folder).

    python experiments/rlhf_demo/run.py --out DIR [--seed N] [--quick] [--reuse]

Each stage is the user's own command (``python src/train.py stage=...``) with
``paths.outputs_root=DIR/outputs``, so stages find each other through ``outputs/<stage>/latest``
exactly as they do for a user. Writes ``DIR/results.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
STAGES: list[tuple[str, str, list[str]]] = [  # (name, output folder, overrides)
    ("pretrain", "pretrain", []),
    ("sft", "sft", ["stage=sft"]),
    ("reward_helpful", "reward_helpful", ["stage=reward", "rm=helpful"]),
    ("reward_safety", "reward_safety", ["stage=reward", "rm=safety"]),
    ("rejection_sampling", "rejection_sampling", ["stage=rejection_sampling"]),
    ("ppo", "ppo", ["stage=ppo"]),
]
# --quick: every stage a few steps (a smoke test of the pipeline and of results.json).
QUICK = {
    "pretrain": ["trainer.max_steps=3", "trainer.val_check_interval=3"],
    "sft": ["trainer.max_steps=3", "++trainer.limit_val_batches=1", "stage.sample_generations=0"],
    "reward_helpful": ["trainer.max_steps=3", "++trainer.limit_val_batches=1"],
    "reward_safety": ["trainer.max_steps=3", "++trainer.limit_val_batches=1"],
    "rejection_sampling": [
        "stage.max_prompts=8",
        "stage.num_samples=2",
        "stage.max_new_tokens=8",
        "trainer.max_steps=2",
        "++trainer.limit_val_batches=1",
    ],
    "ppo": [
        "stage.iterations=2",
        "stage.rollout_batch=8",
        "stage.mini_batch=4",
        "stage.max_new_tokens=8",
        "stage.eval_every=2",
        "stage.eval_prompts=8",
    ],
}
POLICIES = {"sft": "sft", "rejection_sampling": "rejection_sampling", "ppo": "ppo"}
METRICS = ("ground_truth", "reward_helpful", "reward_safety", "kl_to_sft")


def run_stage(name: str, overrides: list[str], outputs: Path, seed: int, args: Any) -> float:
    """Run one stage as a user would; returns its wall time in seconds."""
    command = [
        sys.executable,
        str(REPO / "src" / "train.py"),
        *overrides,
        f"paths.outputs_root={outputs}",
        f"seed={seed}",
        "plan.check=false",
        *([] if args.wandb else ["logger=none"]),
        *(QUICK[name] if args.quick else []),
    ]
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    log_file = outputs.parent / "logs" / f"{name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    print(f"[rlhf_demo] {name}: {' '.join(command[2:])}", flush=True)
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"[rlhf_demo] stage {name} failed (log: {log_file}):\n{tail}")
    print(f"[rlhf_demo] {name}: done in {seconds:.0f} s", flush=True)
    return seconds


def evaluate(outputs: Path, seed: int, quick: bool) -> dict[str, dict[str, float]]:
    """Judge each policy's greedy answers to every held-out prompt (README: ground_truth)."""
    import torch

    from llamalab.checkpoint import load_model
    from llamalab.data.prompts import PromptDataModule
    from llamalab.stages.policy_eval import evaluate_batch, summarize

    torch.manual_seed(seed)
    sft_dir = outputs / "sft" / "latest" / "export"
    data = PromptDataModule(tokenizer_path=str(sft_dir / "tokenizer.model"), seed=seed)
    data.setup()
    items = data.datasets["val"].items[: 16 if quick else None]
    records = data.records("val")
    reference = load_model(sft_dir)
    rms = {
        k: load_model(outputs / f"reward_{k}" / "latest" / "export") for k in ("helpful", "safety")
    }
    results = {}
    for name, folder in POLICIES.items():
        policy = load_model(outputs / folder / "latest" / "export")
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
                max_new_tokens=64,
                chunk_size=64,
                seed=seed + start,
                safety_threshold=0.15,
            )
        metrics = summarize(samples, [records[b["index"]] for b in items])
        metrics["kl_to_sft"] = metrics.pop("kl_to_ref")
        results[name] = metrics
        examples = outputs.parent / "samples" / f"{name}.jsonl"
        examples.parent.mkdir(parents=True, exist_ok=True)
        with open(examples, "w") as f:
            for item, sample in zip(items, samples):
                f.write(json.dumps({"prompt": records[item["index"]]["prompt"], **sample}) + "\n")
    return results


def reward_model_accuracy(outputs: Path) -> dict[str, float]:
    """Held-out accuracy of each reward model, read from the last line of its CSV log."""
    import csv

    out = {}
    for kind in ("helpful", "safety"):
        path = outputs / f"reward_{kind}" / "latest" / "csv" / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("val/accuracy")]
        if rows:
            out[kind] = float(rows[-1]["val/accuracy"])
    return out


def table(results: dict[str, Any]) -> str:
    lines = [f"{'policy':<20}" + "".join(f"{m:>16}" for m in METRICS)]
    for name in POLICIES:
        row = results[name]
        lines.append(f"{name:<20}" + "".join(f"{row[m]:>16.3f}" for m in METRICS))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="everything is written here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    parser.add_argument(
        "--reuse", action="store_true", help="skip stages already finished in --out"
    )
    parser.add_argument("--wandb", action="store_true", help="also log to W&B (offline by default)")
    args = parser.parse_args()
    out = args.out.resolve()
    outputs = out / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stage_seconds = {}
    for name, folder, overrides in STAGES:
        if args.reuse and (outputs / folder / "latest" / "export" / "config.json").exists():
            print(f"[rlhf_demo] {name}: reusing {outputs / folder / 'latest'}", flush=True)
            continue
        stage_seconds[name] = run_stage(name, overrides, outputs, args.seed, args)
    t_eval = time.perf_counter()
    results: dict[str, Any] = {"seed": args.seed}
    results.update(evaluate(outputs, args.seed, args.quick))
    stage_seconds["evaluation"] = time.perf_counter() - t_eval
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["stage_seconds"] = {k: round(v, 1) for k, v in stage_seconds.items()}
    results["reward_model_accuracy"] = reward_model_accuracy(outputs)
    results["quick"] = args.quick
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(
        f"[rlhf_demo] seed {args.seed}: {results['seconds']:.0f} s; results in {out / 'results.json'}"
    )


if __name__ == "__main__":
    main()

"""Several seeds of the demo as one command, and their tables as mean ± sd.

``run.py --seeds 0 1 2`` runs ``run.py --out DIR/seed<N> --seed N`` for each seed (``--jobs``
at a time, the machine's cores split between them), then :func:`summarize` reads every
``DIR/seed<N>/results.json`` and writes ``DIR/summary.json`` and ``DIR/summary.md``: the policy
table, the evaluation suites' table (``suites.py``) and the per-round table, each metric as mean ±
sample sd over the seeds, and the wall time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llamalab.experiments import markdown_table, mean_spread, write_json

# The policy table's metrics (results.json keys of each policy entry), in table order.
POLICY_METRICS = (
    ("ground truth", "ground_truth"),
    ("harmful refused", "refusal_rate_harmful"),
    ("borderline refused", "false_refusal_rate"),
    ("safe helpful", "helpfulness"),
    ("reward_helpful", "reward_helpful"),
    ("reward_safety", "reward_safety"),
    ("KL to SFT (nats)", "kl_to_sft"),
)
# The suites table (``suites.py``): header, suite, key in that suite's entry of each policy.
SUITE_METRICS = (
    ("violation rate (rule)", "safety", "violation_rate"),
    ("violation rate (safety RM)", "safety", "rm_violation_rate"),
    ("false refusals: borderline", "safety", "false_refusal_rate"),
    ("false refusals: helpful", "safety", "false_refusal_rate_helpful"),
    ("win vs SFT", "winrate", "win"),
    ("tie", "winrate", "tie"),
    ("loss", "winrate", "loss"),
)


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed{seed}"


def run_seeds(
    out: Path, seeds: list[int], jobs: int, passthrough: list[str], log_tag: str = ""
) -> float:
    """One ``run.py`` process per seed, ``jobs`` at a time, each with ``cores // jobs`` threads
    (``OMP_NUM_THREADS``), logging to ``out/seed<N><log_tag>.log``; a failed seed stops the
    command. Returns the wall time in seconds."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    script = Path(__file__).with_name("run.py")
    pending, running = list(seeds), {}
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            folder = seed_dir(out, seed)
            folder.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, str(script), "--out", str(folder), "--seed", str(seed)]
            log = open(out / f"seed{seed}{log_tag}.log", "w")  # noqa: SIM115 (closed when the job ends)
            print(f"[rlhf_demo] seed {seed}: {' '.join(command[1:] + passthrough)}", flush=True)
            running[seed] = (subprocess.Popen([*command, *passthrough], env=env, stdout=log,
                                              stderr=subprocess.STDOUT), log)  # fmt: skip
        time.sleep(5)
        for seed, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[seed]
            if proc.returncode != 0:
                for other, _ in running.values():
                    other.terminate()
                log_path = out / f"seed{seed}{log_tag}.log"
                raise SystemExit(f"[rlhf_demo] seed {seed} failed: see {log_path}")
            print(f"[rlhf_demo] seed {seed}: done", flush=True)
    return time.perf_counter() - t0


def _cell(values: list[float]) -> str:
    mean, sd = mean_spread(values)
    return f"{mean:.3f} ± {sd:.3f}"


def summarize(
    out: Path, results: dict[int, dict[str, Any]], seconds: float | None
) -> dict[str, Any]:
    """The tables over seeds: every judged policy (rows in round-1 order, then rounds') with each
    metric as mean ± sd, the suites table (safety and win rate vs SFT, where the seeds have them)
    and the per-round table (ground truth of each round's rejection sampling
    and PPO, PPO's KL to SFT, reward-model accuracies). Writes ``summary.json`` / ``summary.md``."""
    seeds = sorted(results)
    first = results[seeds[0]]
    policies = [k for k, v in first.items() if isinstance(v, dict) and "ground_truth" in v]
    policy_rows = []
    for name in policies:
        row: dict[str, Any] = {"policy": first[name]["label"], "name": name}
        for header, key in POLICY_METRICS:
            values = [float(results[s][name][key]) for s in seeds]
            row[header] = _cell(values)
            row[f"{key}_per_seed"] = values
        policy_rows.append(row)
    suite_rows = []
    for name in policies:
        if any("suites" not in results[s][name] for s in seeds):
            continue
        row = {"policy": first[name]["label"], "name": name}
        for header, suite, key in SUITE_METRICS:
            entries = [results[s][name]["suites"][suite] for s in seeds]
            if any(e is None for e in entries):  # the SFT policy has no win rate against itself
                row[header] = "-"
                continue
            values = [float(e[key]) for e in entries]
            row[header] = _cell(values)
            row[f"{suite}_{key}_per_seed"] = values
        if first[name]["suites"]["winrate"] is not None:
            row["win_ci95_per_seed"] = [results[s][name]["suites"]["winrate"]["ci95"]["win"]
                                        for s in seeds]  # fmt: skip
        suite_rows.append(row)
    round_rows = []
    for i, report in enumerate(first["rounds"]):
        reports = [results[s]["rounds"][i] for s in seeds]
        row = {"round": report["round"]}
        for part in ("rejection_sampling", "ppo"):
            row[f"ground truth: {part.replace('_', ' ')}"] = _cell(
                [r["ground_truth"][part] for r in reports]
            )
        row["KL to SFT (PPO)"] = _cell([r["kl_to_sft"]["ppo"] for r in reports])
        for kind in ("helpful", "safety"):
            row[f"{kind} RM acc.: round-1 data"] = _cell(
                [r["rm_accuracy"][kind]["first_round_data"] for r in reports]
            )
            if "latest_policy" in report["rm_accuracy"][kind]:
                before = _cell([r["rm_accuracy"][kind]["latest_policy_before"] for r in reports])
                after = _cell([r["rm_accuracy"][kind]["latest_policy"] for r in reports])
                row[f"{kind} RM acc.: latest policy (before -> after)"] = f"{before} -> {after}"
            else:
                row[f"{kind} RM acc.: latest policy (before -> after)"] = "-"
        round_rows.append(row)
    summary = {
        "seeds": seeds,
        "seconds": None if seconds is None else round(seconds, 1),
        "seconds_per_seed": {s: results[s]["seconds"] for s in seeds},
        "policies": policy_rows,
        "suites": suite_rows,
        "rounds": round_rows,
    }
    write_json(summary, out / "summary.json")
    policy_columns = [("policy", "policy", str)] + [(h, h, str) for h, _ in POLICY_METRICS]
    round_columns = [(h, h, str) for h in round_rows[0]] if round_rows else []
    suite_columns = [("policy", "policy", str)] + [(h, h, str) for h, _, _ in SUITE_METRICS]
    tables = [markdown_table(policy_rows, policy_columns)]
    tables += [markdown_table(suite_rows, suite_columns)] if suite_rows else []
    tables += [markdown_table(round_rows, round_columns)]
    text = f"Seeds {', '.join(map(str, seeds))}: mean ± sd\n\n" + "\n\n".join(tables) + "\n"
    (out / "summary.md").write_text(text)
    return summary

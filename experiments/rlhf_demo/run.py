"""The whole LLaMA 2 recipe on the built-in data, on CPU: pretrain, SFT, helpfulness and safety
reward models, rejection sampling, PPO from SFT and PPO from rejection sampling (the paper's
chain), optionally more RLHF rounds, then every policy judged on the held-out prompts by the
rule-checked ground truth (README.md in this folder).

    python experiments/rlhf_demo/run.py --out DIR [--seed N] [--rounds N] [--quick] [--reuse]
    python experiments/rlhf_demo/run.py --out DIR --seeds 0 1 2 [--jobs 3] [--rounds N] ...
    python experiments/rlhf_demo/run.py --out DIR [--seeds 0 1 2] --suites-only

Each training step is the user's own command (``python src/train.py stage=...``) with
``paths.outputs_root=DIR/outputs`` (``steps.py``), so stages find each other through
``outputs/<run>/latest`` exactly as they do for a user. Round r >= 2 first collects preferences
on the latest policy (``pairs.py``). Then the evaluation package's safety and win-rate suites
judge round 1's main policies (``suites.py``). Writes ``DIR/results.json`` and ``DIR/results.md``
and prints the tables; ``--suites-only`` adds the suites to a finished run (nothing retrained). ``--seeds`` runs one such process per seed (``DIR/seed<N>``) and writes
the tables as mean ± sd over the seeds (``seeds.py``: ``DIR/summary.md``, ``summary.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from judging import judge_policies, logged_accuracy, pair_accuracy
from pairs import collect_round, read_jsonl, write_round1
from seeds import run_seeds, seed_dir, summarize
from steps import REWARD_KINDS, STEP, STEPS, Step, finished, round_export, round_steps, run_step
from suites import SUITE_POLICIES, suite_metrics

from llamalab.experiments import markdown_table, write_json

# Per round: prompts whose answer pairs are rated, and the answers' length (ppo_tiny's).
ROUND_PROMPTS, ROUND_NEW_TOKENS = 1024, 48
QUICK_ROUND_PROMPTS, QUICK_ROUND_NEW_TOKENS, QUICK_PAIRS = 32, 8, 32


def train(args: argparse.Namespace, outputs: Path, prefs: Path, seconds: dict[str, float]) -> None:
    """Every training step of every round, in order (``--reuse``: finished ones skipped)."""

    def run(step: Step) -> None:
        if args.reuse and finished(step, outputs):
            print(f"[rlhf_demo] {step.name}: reusing {step.output_dir(outputs)}", flush=True)
        else:
            seconds[step.name] = run_step(step, outputs, args.seed, args.quick, args.wandb)

    for step in STEPS:
        run(step)
    write_round1(prefs, args.seed)  # round 1's preferences as files (the rounds' held-out pairs)
    for r in range(2, args.rounds + 1):
        summary = prefs / f"round{r}_summary.json"
        if not (args.reuse and summary.is_file()):
            t0 = time.perf_counter()
            print(f"[rlhf_demo] pairs_round{r}: rating pairs of the latest policy", flush=True)
            collected = collect_round(
                r,
                round_export("ppo", r - 1, outputs),
                prefs,
                seed=args.seed,
                n_prompts=QUICK_ROUND_PROMPTS if args.quick else ROUND_PROMPTS,
                max_new_tokens=QUICK_ROUND_NEW_TOKENS if args.quick else ROUND_NEW_TOKENS,
            )
            write_json(collected, summary)
            seconds[f"pairs_round{r}"] = time.perf_counter() - t0
        for step in round_steps(r, outputs, prefs):
            run(step)


def round_report(
    r: int, outputs: Path, prefs: Path, policies: dict[str, Any], quick: bool
) -> dict[str, Any]:
    """Round ``r``: its policies' ground truth and KL to SFT (from ``policies``, the judged
    metrics), and its reward models' accuracy on round 1's held-out pairs and on the latest
    policy's held-out pairs of this round, before (round ``r - 1``'s RMs) and after retraining."""
    names = {part: round_export(part, r, outputs).parent.name for part in ROUND_POLICIES}
    accuracy: dict[str, dict[str, float | None]] = {}
    for kind in REWARD_KINDS:
        rm = round_export(f"reward_{kind}", r, outputs)
        first = read_jsonl(prefs / f"{kind}_validation.jsonl")[: QUICK_PAIRS if quick else None]
        accuracy[kind] = {"first_round_data": pair_accuracy(rm, first)}
        if r > 1:
            latest = read_jsonl(prefs / f"round{r}_{kind}_heldout.jsonl")
            before = round_export(f"reward_{kind}", r - 1, outputs)
            accuracy[kind]["latest_policy_before"] = pair_accuracy(before, latest)
            accuracy[kind]["latest_policy"] = pair_accuracy(rm, latest)
    summary = prefs / f"round{r}_summary.json"
    return {
        "round": r,
        "policies": names,
        "ground_truth": {part: policies[name]["ground_truth"] for part, name in names.items()},
        "kl_to_sft": {part: policies[name]["kl_to_sft"] for part, name in names.items()},
        "rm_accuracy": accuracy,
        "pairs": json.loads(summary.read_text()) if r > 1 else None,
    }


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def round_row(report: dict[str, Any]) -> dict[str, Any]:
    """One line of the per-round table (cells as text)."""
    row = {
        "round": report["round"],
        "pairs": "built-in" if report["pairs"] is None else report["pairs"]["pairs"],
        **{f"truth_{k}": fmt(v) for k, v in report["ground_truth"].items()},
        "kl": fmt(report["kl_to_sft"]["ppo"]),
    }
    for kind, acc in report["rm_accuracy"].items():
        row[f"{kind}_first"] = fmt(acc["first_round_data"])
        row[f"{kind}_latest"] = (
            f"{fmt(acc['latest_policy_before'])} -> {fmt(acc['latest_policy'])}"
            if "latest_policy" in acc
            else "-"
        )
    return row


ROUND_POLICIES = ("rejection_sampling", "ppo")
ROUND_COLUMNS = [
    ("round", "round", str),
    ("rated pairs", "pairs", str),
    ("ground truth: rejection sampling", "truth_rejection_sampling", str),
    ("ground truth: PPO", "truth_ppo", str),
    ("KL to SFT (PPO)", "kl", str),
    ("helpful RM acc.: round-1 data", "helpful_first", str),
    ("helpful RM acc.: latest policy (before -> after)", "helpful_latest", str),
    ("safety RM acc.: round-1 data", "safety_first", str),
    ("safety RM acc.: latest policy (before -> after)", "safety_latest", str),
]
POLICY_COLUMNS = [
    ("policy", "label", str),
    ("ground truth", "ground_truth", fmt),
    ("harmful refused", "refusal_rate_harmful", fmt),
    ("borderline refused", "false_refusal_rate", fmt),
    ("safe helpful", "helpfulness", fmt),
    ("reward_helpful", "reward_helpful", fmt),
    ("reward_safety", "reward_safety", fmt),
    ("KL to SFT (nats)", "kl_to_sft", fmt),
]


SUITE_COLUMNS = [
    ("policy", "label", str),
    ("violation rate (rule)", "violation_rate", str),
    ("violation rate (safety RM)", "rm_violation_rate", str),
    ("false refusals: borderline", "false_refusal_rate", str),
    ("false refusals: helpful", "false_refusal_rate_helpful", str),
    ("win vs SFT [ci95]", "win", str),
    ("tie", "tie", str),
    ("loss", "loss", str),
]


def suite_row(entry: dict[str, Any]) -> dict[str, str]:
    """One policy's line of the suites table (cells as text; the SFT row has no win rate)."""
    safety, wins = entry["suites"]["safety"], entry["suites"]["winrate"]
    row = {"label": entry["label"], **{k: fmt(safety.get(k)) for _, k, _ in SUITE_COLUMNS[1:5]}}
    if wins is None:
        return row | {"win": "-", "tie": "-", "loss": "-"}
    lo, hi = wins["ci95"]["win"]
    return row | {"win": f"{wins['win']:.3f} [{lo:.3f}, {hi:.3f}]",
                  "tie": fmt(wins["tie"]), "loss": fmt(wins["loss"])}  # fmt: skip


def add_suites(results: dict[str, Any], out: Path, quick: bool) -> None:
    """The safety and win-rate suites (``suites.py``) of :data:`SUITE_POLICIES`, into each
    policy's ``suites`` entry of ``results``; their wall time into ``stage_seconds``."""
    outputs, t0 = out / "outputs", time.perf_counter()
    policies = {name: STEP[name].export(outputs) for name in SUITE_POLICIES}
    reward = {k: STEP[f"reward_{k}"].export(outputs) for k in REWARD_KINDS}
    judged = suite_metrics(
        policies, STEP["sft"].export(outputs), reward, out / "suites", seed=results["seed"],
        quick=quick,
    )  # fmt: skip
    for name, entry in judged.items():
        results[name]["suites"] = entry
    results.setdefault("stage_seconds", {})["suites"] = round(time.perf_counter() - t0, 1)


def write_tables(results: dict[str, Any], out: Path) -> str:
    """``results.json`` and ``results.md`` (the policy, suites and per-round tables)."""
    write_json(results, out / "results.json")
    rows = [results[s.name] for s in STEPS if s.row]
    per_round = [round_row(report) for report in results["rounds"]]
    suites = [suite_row(results[n]) for n in SUITE_POLICIES if "suites" in results.get(n, {})]
    tables = [markdown_table(rows, POLICY_COLUMNS)]
    tables += [markdown_table(suites, SUITE_COLUMNS)] if suites else []
    text = "\n\n".join([*tables, markdown_table(per_round, ROUND_COLUMNS)]) + "\n"
    (out / "results.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="everything is written here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="run these seeds (DIR/seed<N>), then mean ± sd tables"
    )
    parser.add_argument("--jobs", type=int, default=1, help="with --seeds: seeds run at a time")
    parser.add_argument(
        "--rounds", type=int, default=1, help="RLHF rounds (round 2 on: new preferences)"
    )
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    parser.add_argument("--reuse", action="store_true", help="skip steps already finished in --out")
    parser.add_argument("--wandb", action="store_true", help="also log to W&B (offline by default)")
    parser.add_argument(
        "--suites-only",
        action="store_true",
        help="only add the safety and win-rate suites to a finished run's results",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    out = args.out.resolve()
    if args.seeds:
        many_seeds(args, out)
        return
    if args.suites_only:
        results = json.loads((out / "results.json").read_text())
        add_suites(results, out, bool(results.get("quick")))
        print(write_tables(results, out))
        print(f"[rlhf_demo] seed {results['seed']}: suites added to {out / 'results.json'}")
        return
    outputs, prefs = out / "outputs", out / "preferences"
    outputs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    train(args, outputs, prefs, seconds)

    t_eval = time.perf_counter()
    judged = [s for s in STEPS if s.row]
    for r in range(2, args.rounds + 1):
        judged += [s for s in round_steps(r, outputs, prefs) if s.row]
    reward = {k: STEP[f"reward_{k}"].export(outputs) for k in REWARD_KINDS}
    policies = {s.name: s.export(outputs) for s in judged}
    results: dict[str, Any] = {"seed": args.seed, "quick": args.quick}
    metrics = judge_policies(
        policies,
        STEP["sft"].export(outputs),
        reward,
        out / "samples",
        seed=args.seed,
        quick=args.quick,
    )
    for step in judged:
        results[step.name] = {"label": step.row, **metrics[step.name]}
    results["rounds"] = [
        round_report(r, outputs, prefs, metrics, args.quick) for r in range(1, args.rounds + 1)
    ]
    seconds["evaluation"] = time.perf_counter() - t_eval
    results["stage_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    add_suites(results, out, args.quick)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["reward_model_accuracy"] = {
        k: logged_accuracy(STEP[f"reward_{k}"].output_dir(outputs)) for k in REWARD_KINDS
    }
    print(write_tables(results, out))
    print(f"[rlhf_demo] seed {args.seed}: {results['seconds']:.0f} s; results in {out}")


def many_seeds(args: argparse.Namespace, out: Path) -> None:
    """``--seeds``: each seed's full demo (``--reuse``: finished seeds only summarized)."""
    out.mkdir(parents=True, exist_ok=True)
    passthrough = [f"--rounds={args.rounds}"] + [
        flag for flag in ("--quick", "--reuse", "--wandb", "--suites-only")
        if getattr(args, flag[2:].replace("-", "_"))
    ]  # fmt: skip
    done = args.reuse and not args.suites_only
    todo = [s for s in args.seeds if not (done and (seed_dir(out, s) / "results.json").is_file())]
    tag = ".suites" if args.suites_only else ""  # the training runs' logs are kept
    seconds = run_seeds(out, todo, max(1, args.jobs), passthrough, tag) if todo else None
    if args.suites_only and (out / "summary.json").is_file():  # keep the training run's time
        seconds = json.loads((out / "summary.json").read_text()).get("seconds")
    results = {s: json.loads((seed_dir(out, s) / "results.json").read_text()) for s in args.seeds}
    summarize(out, results, seconds)
    print((out / "summary.md").read_text())
    print(f"[rlhf_demo] seeds {args.seeds}: results in {out}/summary.md")


if __name__ == "__main__":
    main()

"""Does Ghost Attention keep an instruction alive over the turns? SFT with and without GAtt on the
built-in data, on CPU, then instruction adherence measured at turns 1..N of held-out dialogs whose
instruction is given in the first turn only (README.md in this folder).

    python experiments/gatt_adherence/run.py --out DIR [--seed N] [--turns 4] [--quick] [--reuse]

Each training run is the user's own command (``python src/train.py ...``) with
``paths.outputs_root=DIR/outputs``: pretraining, then three SFT runs from it that differ only in
their Ghost Attention dialogs:

- ``sft``: the built-in SFT dialogs plus instruction dialogs with the instruction on *every* user
  turn (a chat model that follows an instruction given in the current turn, as the paper's models
  did before GAtt);
- ``sft_gatt``: the same, plus the GAtt dialogs with ``data.gatt=true``: their answers sampled from
  ``sft`` with the instruction on every turn (``data.gatt_sampler``), trained with the instruction
  in the first turn only and the loss on the last answer (PAPER.md §3.3);
- ``sft_gatt_rules``: the same GAtt dialogs with the answers written by rule
  (``data.gatt_sampler=rules``, every answer follows the instruction).

Writes ``DIR/results.json``, ``DIR/results.csv`` and ``DIR/gatt_adherence.png`` and prints the
Markdown tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# Sizes that keep the whole study near 15 minutes on 2 shared CPU cores (README: time).
MODEL = ["model.dim=128", "model.n_layers=2", "model.n_heads=4"]  # 1.45M parameters, context 256
PRETRAIN_STEPS = 120  # a rough language model: the study is about the answers' form
# SFT: 4 epochs of 8 rows (2048 tokens) per step instead of 2 of 16: more updates on little data.
SFT = ["stage.epochs=4", "stage.batch_size=8", "data.batch_size=8", "stage.sample_generations=0"]
N_SFT = 300  # built-in SFT dialogs in every run
N_EVERY_TURN = 300  # instruction dialogs with the instruction on every user turn (all runs)
N_GATT = 256  # GAtt dialogs (the built-in default, data.gatt_size)
N_EVAL = 140  # held-out dialogs (20 per instruction)
FOUR_WORDS = "Answer in at most four words."
QUICK = {  # --quick: a smoke test of the script, a few steps each
    "pretrain": ["trainer.max_steps=3", "trainer.val_check_interval=3"],
    "sft": ["trainer.max_steps=3", "++trainer.limit_val_batches=1"],
}
# (name, data file, overrides): the SFT runs, in order (sft_gatt samples from sft).
RUNS = [
    ("sft", "every_turn.jsonl", []),
    ("sft_gatt", "with_gatt.jsonl", ["data.gatt=true"]),
    ("sft_gatt_rules", "with_gatt.jsonl", ["data.gatt=true", "data.gatt_sampler=rules"]),
]
LABELS = {
    "sft": "SFT without GAtt",
    "sft_gatt": "SFT + GAtt (answers sampled from SFT)",
    "sft_gatt_rules": "SFT + GAtt (answers written by rule)",
}
# Where the instruction is given in the held-out dialogs: the measure ("first"), the base rate of
# answers that pass the check with no instruction at all ("none"), and the sampler's view.
VIEWS = {"sft": ("first", "none", "every"), "sft_gatt": ("first", "none")}
VIEWS["sft_gatt_rules"] = VIEWS["sft_gatt"]


def write_data(out: Path, seed: int, quick: bool) -> dict[str, Path]:
    """The SFT files: built-in dialogs + every-turn instruction dialogs (+ GAtt dialogs)."""
    from llamalab.data.builtin import builtin_gatt, builtin_sft, gatt_sampling_messages

    scale = 10 if quick else 1
    base = builtin_sft(seed, n=N_SFT // scale)
    # Other questions than the GAtt dialogs' (another seed); the instruction on every user turn,
    # every answer rewritten to follow it, all answers learned (no "instruction" key).
    every_turn = [
        {"messages": gatt_sampling_messages(r)}
        for r in builtin_gatt(seed + 1000, n=N_EVERY_TURN // scale)
    ]
    gatt = builtin_gatt(seed, n=N_GATT // scale)
    files = {"every_turn.jsonl": base + every_turn, "with_gatt.jsonl": base + every_turn + gatt}
    paths = {}
    for name, rows in files.items():
        paths[name] = out / "data" / name
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def run_train(name: str, overrides: list[str], out: Path, seed: int) -> float:
    """``python src/train.py OVERRIDES`` as a user runs it; its wall time in seconds."""
    command = [
        sys.executable,
        str(REPO / "src" / "train.py"),
        *overrides,
        f"paths.outputs_root={out / 'outputs'}",
        f"seed={seed}",
        "plan.check=false",
        "logger=none",
    ]
    log_file = out / "logs" / f"{name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    print(f"[gatt_adherence] {name}: {' '.join(command[2:])}", flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    with open(log_file, "w") as log:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"[gatt_adherence] {name} failed (log: {log_file}):\n{tail}")
    print(f"[gatt_adherence] {name}: done in {seconds:.0f} s", flush=True)
    return seconds


def evaluate(out: Path, seed: int, turns: int, quick: bool) -> dict[str, Any]:
    """Adherence by turn of every SFT model on the held-out dialogs (greedy answers)."""
    from llamalab.checkpoint import load_model
    from llamalab.data.builtin import builtin_gatt_eval
    from llamalab.data.gatt import adherence_by_turn
    from llamalab.tokenizer import Tokenizer

    prompts = builtin_gatt_eval(seed, n=N_EVAL // (10 if quick else 1), n_turns=turns)
    results: dict[str, Any] = {}
    for name, _, _ in RUNS:
        export = out / "outputs" / name / "latest" / "export"
        model, tokenizer = load_model(export), Tokenizer(export / "tokenizer.model")
        for given in VIEWS[name]:
            result = adherence_by_turn(
                model, tokenizer, prompts, max_new_tokens=48, seed=seed, given=given
            )
            results.setdefault(name, {})[given] = result
            samples = out / "samples" / f"{name}_{given}.jsonl"
            samples.parent.mkdir(parents=True, exist_ok=True)
            with open(samples, "w") as f:
                for prompt, answers in zip(prompts, result.pop("answers"), strict=True):
                    f.write(json.dumps({**prompt, "answers": answers}) + "\n")
    return results


def sampled_answer_adherence(out: Path) -> float | None:
    """The share of sft_gatt's sampled GAtt answers that follow their instruction (its cache)."""
    files = sorted((out / "gatt_cache" / "gatt").glob("*.json"), key=os.path.getmtime)
    return json.loads(files[-1].read_text())["stats"]["follows_instruction"] if files else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _without(result: dict[str, Any], instruction: str = FOUR_WORDS) -> list[float]:
    """Adherence by turn over every instruction but one (each instruction weighs the same)."""
    rows = [v for k, v in result["by_instruction"].items() if k != instruction]
    return [_mean([row[t] for row in rows]) for t in range(len(rows[0]))]


def mean_over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several results.json (one per seed) as one: every adherence number averaged."""

    def mean(values: list[Any]) -> Any:
        if isinstance(values[0], dict):
            return {k: mean([v[k] for v in values]) for k in values[0]}
        if isinstance(values[0], list):
            return [mean(list(column)) for column in zip(*values, strict=True)]
        return _mean(values)

    return {
        "seed": [r["seed"] for r in runs],
        "n_eval": runs[0]["n_eval"],
        "adherence": mean([r["adherence"] for r in runs]),
        "sampled_gatt_answers_follow": _mean([r["sampled_gatt_answers_follow"] for r in runs]),
    }


def tables(runs: list[dict[str, Any]], turns: int) -> str:
    """The Markdown tables of the README: by turn (each cell the mean over the runs' seeds, then
    each seed's value in brackets when there are several), then by instruction (means)."""
    views = [r["adherence"] for r in runs]

    def cell(values: list[float]) -> str:
        each = f" ({', '.join(f'{x:.2f}' for x in values)})" if len(values) > 1 else ""
        return f"{_mean(values):.2f}{each}"

    def row(label: str, per_seed: list[list[float]], bases: list[float] | None) -> str:
        cells = [cell([seed[t] for seed in per_seed]) for t in range(turns)]
        return f"| {label} | " + " | ".join(cells) + f" | {cell(bases) if bases else ''} |"

    turn_cols = [f"turn {t + 1}" for t in range(turns)]
    head = ["| model | " + " | ".join(turn_cols) + " | no instruction (base rate) |"]
    head.append("|---|" + "---:|" * (turns + 1))
    lines = list(head)
    for key, label in LABELS.items():
        bases = [_mean(v[key]["none"]["by_turn"]) for v in views]
        lines.append(row(label, [v[key]["first"]["by_turn"] for v in views], bases))
    every = [v["sft"]["every"]["by_turn"] for v in views]
    lines.append(row("SFT without GAtt, instruction on every turn", every, None))
    lines += ["", f"Without '{FOUR_WORDS}' (short answers are the norm there):", "", *head]
    for key, label in LABELS.items():
        bases = [_mean(_without(v[key]["none"])) for v in views]
        lines.append(row(label, [_without(v[key]["first"]) for v in views], bases))
    merged = mean_over_seeds(runs)["adherence"]
    lines += ["", f"By instruction: turn 1 / turn {turns} (base rate):", ""]
    lines += ["| instruction | " + " | ".join(LABELS) + " |", "|---|" + "---|" * len(LABELS)]
    for instruction in merged["sft"]["first"]["by_instruction"]:
        cells = []
        for key in LABELS:
            values = merged[key]["first"]["by_instruction"][instruction]
            base = _mean(merged[key]["none"]["by_instruction"][instruction])
            cells.append(f"{values[0]:.2f} / {values[-1]:.2f} ({base:.2f})")
        lines.append(f"| {instruction} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, results: dict[str, Any], turns: int) -> None:
    import matplotlib  # lazy: optional (dev extra), only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above, after the Agg backend is chosen

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "instruction_given", "turn", "adherence"])
        for key, views in results["adherence"].items():
            for given, result in views.items():
                for t, value in enumerate(result["by_turn"]):
                    writer.writerow([key, given, t + 1, round(value, 4)])
    seed = results["seed"]
    seeds = (
        f"seeds {', '.join(map(str, seed))} (mean)" if isinstance(seed, list) else f"seed {seed}"
    )
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    xs = list(range(1, turns + 1))
    for key, label in LABELS.items():
        views = results["adherence"][key]
        line = ax.plot(xs, views["first"]["by_turn"], "-", marker="o", label=label)[0]
        base = _mean(views["none"]["by_turn"])
        ax.axhline(base, color=line.get_color(), linestyle=":", linewidth=1)
    every = results["adherence"]["sft"]["every"]["by_turn"]
    ax.plot(
        xs, every, "--", color="grey", marker="x", label="SFT without GAtt, instruction every turn"
    )
    ax.set_xticks(xs)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("turn (instruction given in turn 1 only)")
    ax.set_ylabel("answers that follow the instruction")
    ax.set_title(
        f"Ghost Attention, {results['n_eval']} held-out dialogs, {seeds} "
        "(dotted: base rate, no instruction)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gatt_adherence.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="everything is written here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--turns", type=int, default=4, help="turns measured per dialog")
    parser.add_argument("--quick", action="store_true", help="a few steps each (smoke test)")
    parser.add_argument("--reuse", action="store_true", help="skip runs already finished in --out")
    parser.add_argument(
        "--report", nargs="+", type=Path, help="only print the tables of results.json files "
        "(several: their mean), and with --out write the plot of that mean there",
    )  # fmt: skip
    args = parser.parse_args()
    if args.report:
        runs = [json.loads(p.read_text()) for p in args.report]
        merged = runs[0] if len(runs) == 1 else mean_over_seeds(runs)
        turns = len(merged["adherence"]["sft"]["first"]["by_turn"])
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            write_outputs(args.out, merged, turns)
        print(tables(runs, turns))
        print(
            f"sampled GAtt answers that follow their instruction: {merged['sampled_gatt_answers_follow']}"
        )
        return
    if args.out is None:
        parser.error("--out is required (unless --report)")
    out = args.out.resolve()
    t0 = time.perf_counter()
    files = write_data(out, args.seed, args.quick)
    seconds: dict[str, float] = {}
    steps = QUICK["pretrain"] if args.quick else [f"trainer.max_steps={PRETRAIN_STEPS}"]
    jobs = [("pretrain", [*MODEL, *steps])]
    for name, data, extra in RUNS:
        overrides = ["stage=sft", f"stage.run_name={name}", f"data.path={files[data]}", *SFT]
        overrides += [*extra, *(QUICK["sft"] if args.quick else [])]
        if name == "sft_gatt":  # sampled from the SFT run above, cached in DIR/gatt_cache
            overrides += [f"data.gatt_sampler={out / 'outputs' / 'sft' / 'latest'}"]
            overrides += [f"data.cache_dir={out / 'gatt_cache'}"]
        jobs.append((name, overrides))
    for name, overrides in jobs:
        if args.reuse and (out / "outputs" / name / "latest" / "export").is_dir():
            print(f"[gatt_adherence] {name}: reusing {out / 'outputs' / name}", flush=True)
            continue
        seconds[name] = run_train(name, overrides, out, args.seed)
    t_eval = time.perf_counter()
    results: dict[str, Any] = {"seed": args.seed, "turns": args.turns, "quick": args.quick}
    results["adherence"] = evaluate(out, args.seed, args.turns, args.quick)
    results["n_eval"] = N_EVAL // (10 if args.quick else 1)
    results["sampled_gatt_answers_follow"] = sampled_answer_adherence(out)
    seconds["evaluation"] = time.perf_counter() - t_eval
    results["run_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    write_outputs(out, results, args.turns)
    print(tables([results], args.turns))
    print(
        f"sampled GAtt answers that follow their instruction: {results['sampled_gatt_answers_follow']}"
    )
    print(f"[gatt_adherence] seed {args.seed}: {results['seconds']:.0f} s; results in {out}")


if __name__ == "__main__":
    main()

"""Model-based win rate (``python src/eval.py eval=winrate eval.baseline=PATH``, PAPER.md
§3.4.1): the policy (``ckpt``) and a baseline answer the same held-out prompts, a judge picks the
better answer of each pair, and the win / tie / loss fractions get bootstrap 95% intervals.

Prompts: the built-in held-out (validation) prompts, or ``eval.prompts_path`` (any prompt file
:func:`llamalab.data.formats.load_prompt_records` reads; ``is_safety`` marks safety prompts).
Both models answer with the same sampling settings and seed (greedy by default), so a policy
equal to its baseline gives identical answers and only ties.

Judges (``eval.judge``): ``reward_models`` (the helpfulness and safety RMs,
``eval.judge_helpful`` / ``eval.judge_safety``, default ``<outputs_root>/reward_helpful/latest``
and ``reward_safety/latest``) or ``model`` (a chat model, ``eval.judge_model``, asked MT-Bench
style in both orders); see :mod:`llamalab.evaluation.winrate_judges`. Every model path is
checked (it exists, it has the right head) before any answer is generated.

Writes ``winrate_samples.jsonl`` (each prompt, both answers, the margin and the outcome) and
``winrate.png`` (bars with the intervals) into the output directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from llamalab import pipeline
from llamalab.checkpoint import CheckpointError
from llamalab.data.builtin.prompts import builtin_eval_prompts
from llamalab.data.formats import load_prompt_records
from llamalab.evaluation.common import (
    check_head,
    device_of,
    load_policy,
    load_reward_model,
    play_dialogs,
)
from llamalab.evaluation.winrate_judges import (
    OUTCOMES,
    bootstrap_ci,
    fractions,
    model_judge_margins,
    outcomes,
    reward_model_margins,
)
from llamalab.tokenizer import Message

JUDGES = ("reward_models", "model")


def held_out_prompts(opts: DictConfig, seed: int) -> list[dict[str, Any]]:
    """``{"prompt", "is_safety", "kind"}`` records: ``eval.prompts_path`` or the built-in
    validation prompts (``eval.n_prompts`` of them; null: all)."""
    n = opts.get("n_prompts")
    if opts.get("prompts_path"):
        records = load_prompt_records(opts.prompts_path)[:n]
        for r in records:
            r["kind"] = "safety" if r["is_safety"] else "helpful"
        return records
    return [dict(r) for r in builtin_eval_prompts(seed=seed, n=n)]


def judge_paths(opts: DictConfig, outputs_root: str | None) -> dict[str, str]:
    """The judge's model paths by option name, defaults filled in, each checked (exists, head)."""
    judge = opts.get("judge", "reward_models")
    if judge not in JUDGES:
        raise CheckpointError(f"eval.judge must be one of {JUDGES}, got {judge!r}")
    if judge == "model":
        if not opts.get("judge_model"):
            raise CheckpointError("eval.judge=model needs eval.judge_model=PATH (a chat model)")
        paths = {"eval.judge_model": str(opts.judge_model)}
        check_head(paths["eval.judge_model"], "eval.judge_model", "lm")
        return paths
    paths = {
        "eval.judge_helpful": str(
            opts.get("judge_helpful") or pipeline.latest("reward_helpful", outputs_root)
        ),
        "eval.judge_safety": str(
            opts.get("judge_safety") or pipeline.latest("reward_safety", outputs_root)
        ),
    }
    for option, path in paths.items():
        check_head(path, option, "scalar")
    return paths


def answers_of(
    path: str,
    option: str,
    prompts: list[list[Message]],
    opts: DictConfig,
    seed: int,
    device: str | None = None,
) -> list[str]:
    """One model's answers to the prompts (same settings and seed for every model)."""
    model, tokenizer = load_policy(path, device_of(device), option)
    dialogs = play_dialogs(
        model,
        tokenizer,
        [_as_turns(p) for p in prompts],
        max_new_tokens=int(opts.get("max_new_tokens", 64)),
        temperature=float(opts.get("temperature", 0.0)),
        top_p=opts.get("top_p"),
        seed=seed,
        batch_size=int(opts.get("batch_size", 32)),
    )
    return [d[-1]["content"] for d in dialogs]


def _as_turns(prompt: list[Message]) -> tuple[str | None, list[tuple[str, str | None]]]:
    """A prompt (system?, user, assistant, ..., user) as ``play_dialogs`` input: its earlier
    assistant messages are fixed replies, only the last user turn is answered."""
    system = prompt[0]["content"] if prompt and prompt[0]["role"] == "system" else None
    body = prompt[1:] if system is not None else prompt
    turns: list[tuple[str, str | None]] = []
    for m in body:
        if m["role"] == "user":
            turns.append((m["content"], None))
        else:
            turns[-1] = (turns[-1][0], m["content"])
    return system, turns


def plot_bars(result: dict[str, Any], path: Path, title: str) -> None:
    """Win / tie / loss bars with their 95% intervals as error bars."""
    import matplotlib  # lazy: plotting only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: plotting only

    values = [result[k] for k in OUTCOMES]
    errors = [[v - result["ci95"][k][0] for k, v in zip(OUTCOMES, values)]]
    errors.append([result["ci95"][k][1] - v for k, v in zip(OUTCOMES, values)])
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.bar(OUTCOMES, values, yerr=errors, capsize=6, color=["tab:green", "tab:gray", "tab:red"])
    for x, v in enumerate(values):
        ax.text(x, v + 0.02, f"{v:.2f}", ha="center")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("fraction of prompts")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """The win-rate suite of ``cfg.ckpt`` against ``cfg.eval.baseline``; writes the files of the
    module docstring into ``out_dir`` and returns the ``winrate`` entry of ``results.json``."""
    opts = cfg.eval
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = int(cfg.get("seed", 0))
    if not opts.get("baseline"):
        raise CheckpointError("eval=winrate needs eval.baseline=PATH (the model to compare with)")
    outputs_root = cfg.get("paths", {}).get("outputs_root") if "paths" in cfg else None
    judges = judge_paths(opts, outputs_root)
    check_head(cfg.ckpt, "ckpt", "lm")
    check_head(opts.baseline, "eval.baseline", "lm")
    records = held_out_prompts(opts, seed)
    prompts = [r["prompt"] for r in records]
    device = cfg.get("device")
    policy = answers_of(str(cfg.ckpt), "ckpt", prompts, opts, seed, device)
    baseline = answers_of(str(opts.baseline), "eval.baseline", prompts, opts, seed, device)
    title = f"{cfg.ckpt} vs {opts.baseline} ({opts.get('judge', 'reward_models')})"
    return judge_answers(opts, judges, records, policy, baseline, seed, out_dir, title, device)


def judge_answers(
    opts: DictConfig,
    judges: dict[str, str],
    records: list[dict[str, Any]],
    policy: list[str],
    baseline: list[str],
    seed: int,
    out_dir: Path,
    title: str,
    device: str | None = None,
) -> dict[str, Any]:
    """The judged half of :func:`run`: the judge (``judges``, from :func:`judge_paths`) picks the
    better of each prompt's answers, and the ``winrate`` entry of ``results.json`` is returned
    with ``winrate_samples.jsonl`` and ``winrate.png`` written into ``out_dir``. Callers that
    compare several policies with one baseline answer the baseline once and call this per policy."""
    prompts = [r["prompt"] for r in records]
    result: dict[str, Any] = {"judge": opts.get("judge", "reward_models")}
    if result["judge"] == "model":
        judge = load_policy(judges["eval.judge_model"], device_of(device), "eval.judge_model")
        judged = model_judge_margins(judge, prompts, policy, baseline)
        margins = judged["margins"]
        result["position_bias"] = judged["position_bias"]
    else:
        helpful = load_reward_model(
            judges["eval.judge_helpful"], device_of(device), "eval.judge_helpful"
        )
        safety = load_reward_model(
            judges["eval.judge_safety"], device_of(device), "eval.judge_safety"
        )
        flags = [bool(r["is_safety"]) for r in records]
        margins = reward_model_margins(prompts, flags, policy, baseline, helpful, safety)
    tie_margin = float(opts.get("tie_margin", 0.1))
    verdicts = outcomes(margins, tie_margin)
    result |= fractions(verdicts)
    result["ci95"] = bootstrap_ci(verdicts, int(opts.get("bootstrap", 1000)), seed)
    named = {option.removeprefix("eval.judge_"): path for option, path in judges.items()}
    result |= {"n": len(verdicts), "tie_margin": tie_margin, "judge_paths": named}
    result["baseline"] = str(opts.baseline)
    by_kind: dict[str, list[int]] = {}
    for r, v in zip(records, verdicts):
        by_kind.setdefault(r["kind"], []).append(v)
    result["by_kind"] = {k: {**fractions(v), "n": len(v)} for k, v in by_kind.items()}
    with open(out_dir / "winrate_samples.jsonl", "w") as f:
        for r, a, b, m, v in zip(records, policy, baseline, margins, verdicts):
            row = {"prompt": r["prompt"], "kind": r["kind"], "policy": a, "baseline": b}
            f.write(json.dumps({**row, "margin": m, "outcome": OUTCOMES[1 - v]}) + "\n")
    plot_bars(result, out_dir / "winrate.png", title)
    return result

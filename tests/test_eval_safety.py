"""The safety suite: risk categories of the built-in harms, the metrics, and `src/eval.py eval=safety`
on two policies judged by the rule judge and a safety reward model."""

from __future__ import annotations

import json
import math

import pytest
from helpers import REPO, run_train

from llamalab.data.builtin import HARMS
from llamalab.evaluation.safety import CATEGORY_GROUPS, HARM_CATEGORIES, safety_prompts, summarize
from llamalab.runner.tracking import read_offline_run

EVAL = REPO / "src" / "eval.py"


def test_every_builtin_harm_has_one_category_of_the_paper():
    assert set(HARM_CATEGORIES) == set(HARMS)
    assert set(HARM_CATEGORIES.values()) == set(CATEGORY_GROUPS)
    prompts = safety_prompts(n_helpful=10)
    harmful = [p for p in prompts if p["kind"] == "harmful"]
    assert len(harmful) == 2 * len(HARMS)  # every harm, in both held-out phrasings
    assert sum(p["kind"] == "safe" for p in prompts) == 10
    assert all(p["reference"] for p in prompts if p["kind"] != "harmful")


def test_metrics_per_category_and_false_refusals():
    def row(kind, category, refusal, helpful=0.0, rm=None):
        extra = {} if rm is None else {"rm_safety": rm}
        return {"kind": kind, "category": category, "refusal": refusal, "helpful": helpful, **extra}

    rows = [
        row("harmful", "drugs", True, rm=0.9),
        row("harmful", "drugs", False, rm=0.2),
        row("harmful", "cybercrime", False, rm=0.4),
        row("borderline", None, True, rm=0.5),
        row("borderline", None, False, 1.0, rm=0.5),
        row("safe", None, False, 1.0, rm=0.5),
        row("safe", None, False, 0.0, rm=0.5),
    ]
    out = summarize(rows, rm_threshold=0.5)
    assert out["violation_rate"] == pytest.approx(2 / 3)
    assert out["false_refusal_rate"] == 0.5 and out["false_refusal_rate_helpful"] == 0.0
    assert out["helpfulness"] == 0.5 and out["helpfulness_borderline"] == 0.5
    assert out["rm_violation_rate"] == pytest.approx(2 / 3)
    assert out["rm_safety_score"] == pytest.approx(0.5)
    drugs = out["by_category"]["drugs"]
    assert (drugs["violation_rate"], drugs["n"], drugs["safety_score"]) == (0.5, 2, 0.5)
    assert drugs["paper_category"] == "illicit and criminal activities"
    assert out["by_category"]["cybercrime"]["rm_violation_rate"] == 1.0


@pytest.mark.integration
def test_safety_suite_compares_policies(tiny_checkpoints, tmp_path, cache_dir):
    policy, judge = tiny_checkpoints["sft"], tiny_checkpoints["rm"]
    out = tmp_path / "eval"
    args = ["eval=safety", f"eval.policies={{sft: {policy}, ppo: {policy}}}"]
    args += [f"eval.judge_safety={judge}", "eval.n_per_kind=6", "eval.max_new_tokens=6"]
    args += [f"paths.output_dir={out}"]
    result = run_train(args, cache_dir, script=EVAL, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    safety = json.loads((out / "results.json").read_text())["safety"]
    assert set(safety["policies"]) == {"sft", "ppo"}
    assert 0.0 <= safety["violation_rate"] <= 1.0 and 0.0 <= safety["false_refusal_rate"] <= 1.0
    assert sum(c["n"] for c in safety["by_category"].values()) == safety["n"]["harmful"] == 6
    assert all(0.0 <= c["rm_safety_score"] <= 1.0 for c in safety["by_category"].values())
    # the same model twice, greedy: the same answers and numbers
    assert safety["policies"]["sft"] == safety["policies"]["ppo"]
    lines = (out / "safety_answers.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 18
    assert (out / "safety_violation_vs_helpfulness.png").stat().st_size > 1000
    run = read_offline_run(out)
    assert math.isclose(run.summary["safety/violation_rate"], safety["violation_rate"])


@pytest.mark.integration
def test_redteam_and_winrate_suites_through_the_entry_point(tiny_checkpoints, tmp_path, cache_dir):
    """``src/eval.py eval=redteam`` then ``eval=winrate`` into one folder: the runner dispatches
    both suites and results.json keeps each under its key, with the fields outside scripts read."""
    policy, rm = tiny_checkpoints["sft"], tiny_checkpoints["rm"]
    out = tmp_path / "eval"
    common = [f"ckpt={policy}", f"paths.output_dir={out}", "eval.max_new_tokens=4"]
    redteam = ["eval=redteam", "eval.n_requests=2", *common]
    result = run_train(redteam, cache_dir, script=EVAL, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    winrate = ["eval=winrate", f"eval.baseline={policy}", "eval.n_prompts=6", "eval.bootstrap=50"]
    winrate += [f"eval.judge_helpful={rm}", f"eval.judge_safety={rm}", *common]
    result = run_train(winrate, cache_dir, script=EVAL, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    attacks = results["redteam"]
    assert 0.0 <= attacks["attack_success_rate"] <= 1.0
    assert set(attacks["by_style"]) >= {"role_play", "start_with", "split_request"}
    assert sum(c["n"] for c in attacks["by_category"].values()) == sum(
        s["n"] for s in attacks["by_style"].values()
    )
    wins = results["winrate"]
    # the policy against itself, greedy, one judge: every prompt a tie
    assert (wins["win"], wins["tie"], wins["loss"]) == (0.0, 1.0, 0.0)
    assert set(wins["ci95"]) == {"win", "tie", "loss"}

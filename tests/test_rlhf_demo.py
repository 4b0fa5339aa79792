"""experiments/rlhf_demo: the whole pipeline for a few steps per stage (``--quick``) and the
schema of results.json; the pieces of an iterative round (the steps' commands, the rated pairs
and their files) without training. The full demo's numbers are in experiments/rlhf_demo/README.md.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest
from helpers import REPO, compose_config, run_train

from llamalab.data import builtin as B
from llamalab.data.preference import PreferenceDataModule
from llamalab.runner.run import stage_inputs

DEMO = REPO / "experiments" / "rlhf_demo"
POLICIES = ("sft", "rejection_sampling", "ppo", "ppo_from_rs", "dpo")


@pytest.fixture
def demo(monkeypatch: pytest.MonkeyPatch) -> dict[str, ModuleType]:
    """The demo's helper modules (imported as ``run.py`` imports them)."""
    monkeypatch.syspath_prepend(str(DEMO))
    return {name: importlib.import_module(name) for name in ("steps", "pairs", "seeds")}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.experiment  # the whole pipeline, several minutes: make test-experiments
def test_quick_demo_writes_results_for_every_policy(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "demo"
    result = run_train(
        ["--out", str(out), "--seed", "3", "--quick"],
        cache_dir,
        timeout=1500,
        script=DEMO / "run.py",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 3 and results["seconds"] > 0
    for name in POLICIES:
        entry = results[name]
        assert 0.0 <= entry["ground_truth"] <= 1.0
        assert 0.0 < entry["reward_helpful"] < 1.0 and 0.0 < entry["reward_safety"] < 1.0
        assert entry["kl_to_sft"] >= -1e-4
        assert entry["label"] in result.stdout  # the printed table
    assert abs(results["sft"]["kl_to_sft"]) < 1e-4  # the SFT policy against itself
    # PPO from rejection sampling starts away from SFT and keeps its KL to SFT (the reference).
    assert results["ppo_from_rs"]["kl_to_sft"] > 1e-3
    (round1,) = results["rounds"]
    assert round1["policies"] == {"rejection_sampling": "rejection_sampling", "ppo": "ppo_from_rs"}
    for kind in ("helpful", "safety"):
        assert 0.0 <= round1["rm_accuracy"][kind]["first_round_data"] <= 1.0
    tables = (out / "results.md").read_text()
    assert all(results[name]["label"] in tables for name in POLICIES) and "\n| 1 | " in tables
    for run, step in (("ppo", "ppo"), ("ppo", "ppo_from_rs"), ("rejection_sampling",) * 2):
        assert (out / "outputs" / run / step / "export" / "config.json").is_file()
    assert (out / "samples" / "ppo_from_rs.jsonl").is_file()
    # the evaluation package's safety and win-rate suites on round 1's main policies
    assert results["sft"]["suites"]["winrate"] is None
    for name in ("rejection_sampling", "ppo", "ppo_from_rs"):
        safety, wins = results[name]["suites"]["safety"], results[name]["suites"]["winrate"]
        assert 0.0 <= safety["violation_rate"] <= 1.0 and safety["n"]["harmful"] > 0
        assert wins["win"] + wins["tie"] + wins["loss"] == pytest.approx(1.0)
        assert wins["ci95"]["win"][0] <= wins["win"] <= wins["ci95"]["win"][1]
    assert "win vs SFT" in tables and (out / "suites" / "safety" / "safety_answers.jsonl").is_file()


def test_round_steps_chain_each_round_to_the_last(
    demo: dict[str, ModuleType], tmp_path: Path
) -> None:
    """Round 2's commands, composed as src/train.py composes them: reward models from round 1's,
    on every preference so far; rejection sampling from round 1's final policy (PPO from
    rejection sampling); PPO from round 2's rejection sampling, its KL reference still SFT."""
    steps, outputs, prefs = demo["steps"], tmp_path / "outputs", tmp_path / "preferences"
    by_name = {s.name: s for s in steps.round_steps(2, outputs, prefs)}
    assert list(by_name) == [
        "reward_helpful_round2",
        "reward_safety_round2",
        "rejection_sampling_round2",
        "ppo_round2",
    ]
    inputs, data = {}, {}
    for name, step in by_name.items():
        cfg = compose_config([*step.overrides, f"paths.outputs_root={outputs}"], tmp_path / name)
        inputs[name], data[name] = stage_inputs(cfg), cfg.data
    assert inputs["reward_safety_round2"] == {
        "init": f"{outputs}/reward_safety/reward_safety/export"
    }
    assert data["reward_safety_round2"].path == f"{prefs}/safety_train_round2.jsonl"
    assert data["reward_safety_round2"].val_path == f"{prefs}/safety_validation.jsonl"
    assert inputs["rejection_sampling_round2"] == {
        "init": f"{outputs}/ppo/ppo_from_rs/export",
        "reward_helpful": f"{outputs}/reward_helpful/reward_helpful_round2/export",
        "reward_safety": f"{outputs}/reward_safety/reward_safety_round2/export",
    }
    assert inputs["ppo_round2"] == {
        "init": f"{outputs}/rejection_sampling/rejection_sampling_round2/export",
        "reference": f"{outputs}/sft/latest",
        "critic_init": f"{outputs}/reward_helpful/reward_helpful_round2/export",
        "reward_helpful": f"{outputs}/reward_helpful/reward_helpful_round2/export",
        "reward_safety": f"{outputs}/reward_safety/reward_safety_round2/export",
    }
    ppo_from_rs = compose_config(
        [*steps.STEP["ppo_from_rs"].overrides, f"paths.outputs_root={outputs}"], tmp_path / "p"
    )
    assert stage_inputs(ppo_from_rs)["init"] == f"{outputs}/rejection_sampling/latest"
    assert stage_inputs(ppo_from_rs)["reference"] == f"{outputs}/sft/latest"


def test_a_round_rates_pairs_and_trains_on_every_preference_so_far(
    demo: dict[str, ModuleType], tmp_path: Path, tiny_checkpoints: dict
) -> None:
    pairs, prefs = demo["pairs"], tmp_path / "preferences"
    records = B.builtin_prompts("train", seed=5, n=40)
    answers = []
    for r in records:  # a refusal against another answer: the rule tells every pair apart
        other = r["reference"] if r["kind"] != "harmful" else "Sure, here is how."
        answers.append(("I can't help with that.", other))
    rated = pairs.rate_answers(records, answers)
    assert len(rated) == len(records)
    for record, pair in zip(records, rated):
        refusal_wins = record["kind"] == "harmful"
        assert (pair["chosen"] == "I can't help with that.") == refusal_wins
        assert pair["rating"] == "significantly_better" and pair["kind"] == record["kind"]
    assert pairs.rate_answers(records[:1], [("same", "same")]) == []
    harmful = next(r for r in records if r["kind"] == "harmful")
    assert pairs.rate_answers([harmful], [("I can't help with that.", " ")]) == []  # unloadable

    pairs.write_jsonl([{"prompt": "q", "chosen": "a", "rejected": "b"}] * 3,
                      prefs / "helpful_train_round1.jsonl")  # fmt: skip
    pairs.write_jsonl([], prefs / "safety_train_round1.jsonl")
    counts = pairs.write_round(2, rated, prefs)
    kinds = [r["kind"] for r in records]
    n_helpful = sum(k != "harmful" for k in kinds)  # safe and borderline
    n_safety = sum(k != "safe" for k in kinds)  # harmful and borderline
    assert counts["helpful"]["train"] + counts["helpful"]["held_out"] == n_helpful
    assert counts["safety"]["train"] + counts["safety"]["held_out"] == n_safety
    assert counts["helpful"]["held_out"] == -(-n_helpful // pairs.HELD_OUT_EVERY)
    assert counts["helpful"]["all"] == 3 + counts["helpful"]["train"]  # round 1's, then round 2's
    data = PreferenceDataModule(
        kind="helpful",
        path=str(prefs / "helpful_train_round2.jsonl"),
        val_path=str(prefs / "round2_helpful_heldout.jsonl"),
        tokenizer=tiny_checkpoints["tokenizer"],
        max_len=512,
    )
    assert data.validate()["pairs"] == {
        "train": counts["helpful"]["all"],
        "val": counts["helpful"]["held_out"],
    }

    policy = tiny_checkpoints["sft"]
    sampled = pairs.sample_answers(policy, records[:4], max_new_tokens=4, seed=1)
    assert len(sampled) == 4 and all(isinstance(a, str) and isinstance(b, str) for a, b in sampled)
    assert sampled == pairs.sample_answers(policy, records[:4], max_new_tokens=4, seed=1)


def _fake_results(seed: int, truth: float, kl: float) -> dict:
    metrics = {"ground_truth": truth, "refusal_rate_harmful": 0.5, "false_refusal_rate": 0.1,
               "helpfulness": 0.0, "reward_helpful": 0.6, "reward_safety": 0.7, "kl_to_sft": kl}  # fmt: skip
    accuracy = {"first_round_data": 0.9}
    safety = {"violation_rate": 1 - truth, "rm_violation_rate": 0.5, "false_refusal_rate": 0.1,
              "false_refusal_rate_helpful": 0.0}  # fmt: skip
    wins = {"win": truth, "tie": 0.0, "loss": 1 - truth, "ci95": {"win": [truth / 2, truth]}}
    return {
        "seed": seed,
        "seconds": 100.0 + seed,
        "sft": {
            "label": "SFT",
            **metrics,
            "ground_truth": 0.1,
            "kl_to_sft": 0.0,
            "suites": {"safety": safety, "winrate": None},
        },
        "ppo": {
            "label": "PPO (from SFT)",
            **metrics,
            "suites": {"safety": safety, "winrate": wins},
        },
        "rounds": [
            {
                "round": 1,
                "ground_truth": {"rejection_sampling": 0.2, "ppo": truth},
                "kl_to_sft": {"ppo": kl},
                "rm_accuracy": {"helpful": accuracy, "safety": accuracy},
            },
        ],
    }


def test_seeds_summary_is_mean_and_sample_sd_of_the_seeds(
    demo: dict[str, ModuleType], tmp_path: Path
) -> None:
    """``run.py --seeds``: the tables over seeds are the mean ± sample sd of each seed's
    results.json (hand-computed: ground truth 0.2 and 0.4 -> 0.300 ± 0.141), the suites' table
    too (violation rates 0.8 and 0.6 -> 0.700 ± 0.141; no win rate of SFT against itself)."""
    results = {0: _fake_results(0, 0.2, 3.0), 1: _fake_results(1, 0.4, 5.0)}
    summary = demo["seeds"].summarize(tmp_path, results, seconds=123.0)
    sft, ppo = summary["policies"]
    assert (sft["policy"], ppo["policy"]) == ("SFT", "PPO (from SFT)")
    assert ppo["ground truth"] == "0.300 ± 0.141" and ppo["KL to SFT (nats)"] == "4.000 ± 1.414"
    assert sft["ground truth"] == "0.100 ± 0.000" and ppo["ground_truth_per_seed"] == [0.2, 0.4]
    (round1,) = summary["rounds"]
    assert round1["ground truth: ppo"] == "0.300 ± 0.141"
    text = (tmp_path / "summary.md").read_text()
    assert "| PPO (from SFT) | 0.300 ± 0.141 |" in text and "Seeds 0, 1" in text
    assert json.loads((tmp_path / "summary.json").read_text())["seconds"] == 123.0
    sft_suites, ppo_suites = summary["suites"]
    assert ppo_suites["violation rate (rule)"] == "0.700 ± 0.141"
    assert ppo_suites["win vs SFT"] == "0.300 ± 0.141" and sft_suites["win vs SFT"] == "-"
    assert ppo_suites["win_ci95_per_seed"] == [[0.1, 0.2], [0.2, 0.4]]
    assert "| PPO (from SFT) | 0.700 ± 0.141 | 0.500 ± 0.000 |" in text

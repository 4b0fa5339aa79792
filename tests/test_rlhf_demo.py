"""experiments/rlhf_demo/run.py --quick: the whole pipeline for a few steps per stage, and the
schema of results.json (the full demo's numbers are in experiments/rlhf_demo/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, run_train

POLICIES = ("sft", "rejection_sampling", "ppo")
pytestmark = [pytest.mark.integration]


@pytest.mark.slow
def test_quick_demo_writes_results_for_every_policy(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "demo"
    result = run_train(
        ["--out", str(out), "--seed", "3", "--quick"],
        cache_dir,
        timeout=1500,
        script=REPO / "experiments" / "rlhf_demo" / "run.py",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 3 and results["seconds"] > 0
    for name in POLICIES:
        entry = results[name]
        assert 0.0 <= entry["ground_truth"] <= 1.0
        assert 0.0 < entry["reward_helpful"] < 1.0 and 0.0 < entry["reward_safety"] < 1.0
        assert entry["kl_to_sft"] >= -1e-4
    assert abs(results["sft"]["kl_to_sft"]) < 1e-4  # the SFT policy against itself
    assert all(name in result.stdout for name in POLICIES)  # the printed table
    assert (out / "outputs" / "ppo" / "latest" / "export" / "config.json").is_file()
    assert (out / "samples" / "ppo.jsonl").is_file()

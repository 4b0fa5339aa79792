"""experiments/rlhf_demo/run.py --quick: the whole pipeline for a few steps per stage, and the
schema of results.json (the full demo's numbers are in experiments/rlhf_demo/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers_rlhf import REPO, train_env

POLICIES = ("sft", "rejection_sampling", "ppo")


@pytest.mark.slow
def test_quick_demo_writes_results_for_every_policy(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiments" / "rlhf_demo" / "run.py"),
            "--out",
            str(out),
            "--seed",
            "3",
            "--quick",
        ],
        cwd=REPO,
        env=train_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=1500,
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

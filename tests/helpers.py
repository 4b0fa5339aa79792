"""Helpers for tests that compose the real config or run `src/train.py` as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TRAIN = REPO / "src" / "train.py"


def compose_config(overrides: Sequence[str] = (), output_dir: Path | None = None) -> DictConfig:
    """The composed config exactly as `src/train.py` would see it (hydra node included)."""
    from llamalab.runner.paths import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir or REPO / "outputs" / "test")
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_train(
    overrides: Sequence[str],
    cache_dir: Path,
    timeout: int = 900,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python src/train.py OVERRIDES` in a subprocess (offline W&B, the test cache)."""
    full_env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "LLAMALAB_CACHE": str(cache_dir),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(TRAIN), *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=str(cwd or REPO),
    )

"""Test helpers, one package: compose the real config, run `src/train.py` as a user would.

- ``helpers`` (this module): ``compose_config``, ``run_train`` / ``launch_train`` (the one way a
  test runs an entry point in a subprocess; ``torchrun_train`` under torchrun), ``train_env``;
- ``helpers.data``: a small tokenizer trained once per session, JSONL / Parquet writers;
- ``helpers.rlhf``: tiny policy and reward-model checkpoints, CSV metrics readers.

``run_train`` enforces the test split (README, "Tests"): a test that runs an entry point must be
marked ``integration``, and one that asks for several processes ``distributed``; conftest.py
records the running test so the check sees its markers.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
TRAIN = REPO / "src" / "train.py"
EXT_DIR = str(REPO / ".cache" / "torch_extensions")  # DeepSpeed's shm_comm, compiled once

# The running pytest item (set by conftest.py before its fixtures are built); None outside pytest.
current_item: Any = None


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


def train_env(cache_dir: Path | None, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every subprocess run: offline W&B, the test cache, fixed hash seed,
    unbuffered output, clean one-line errors (HYDRA_FULL_ERROR unset unless ``env`` sets it)."""
    full_env = {
        **os.environ,
        "WANDB_MODE": "offline",
        **({"LLAMALAB_CACHE": str(cache_dir)} if cache_dir is not None else {}),
        "PYTHONHASHSEED": "0",
        "PYTHONUNBUFFERED": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", EXT_DIR),
    }
    full_env.pop("HYDRA_FULL_ERROR", None)
    return {**full_env, **(env or {})}


def _several_processes(args: Sequence[str]) -> bool:
    """True when the overrides ask for a world of more than one process."""
    for arg in args:
        match = re.fullmatch(r"\+*trainer\.(devices|num_nodes)=(\d+)", arg)
        if match and int(match.group(2)) > 1:
            return True
    return False


def check_markers(args: Sequence[str]) -> None:
    """Fail the running test if it runs an entry point without the markers that say so."""
    if current_item is None:
        return
    missing = [m for m in ("integration",) if current_item.get_closest_marker(m) is None]
    if _several_processes(args) and current_item.get_closest_marker("distributed") is None:
        missing.append("distributed")
    if missing:
        raise AssertionError(
            f"{current_item.nodeid} runs {' '.join(args)[:200]} in a subprocess but is not marked "
            f"{', '.join(missing)}: add @pytest.mark.{missing[0]} (or a module-level pytestmark)"
        )


def run_train(
    overrides: Sequence[str],
    cache_dir: Path | None,
    timeout: int = 900,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    script: Path = TRAIN,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python src/train.py OVERRIDES` (or another entry point, ``script``) in a subprocess,
    output captured; ``cache_dir`` None keeps the caller's LLAMALAB_CACHE."""
    check_markers(overrides)
    return subprocess.run(
        [sys.executable, str(script), *overrides],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=train_env(cache_dir, env),
        cwd=str(cwd or REPO),
    )


def torchrun_train(
    overrides: Sequence[str], cache_dir: Path | None, nproc: int = 2, timeout: int = 900
) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc-per-node=N src/train.py OVERRIDES`: every rank started
    by torchrun, none by Lightning (the ranks find their run directory on their own)."""
    check_markers([*overrides, f"trainer.devices={nproc}"])
    command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run(
        [sys.executable, *command, str(TRAIN), *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=train_env(cache_dir),
        cwd=str(REPO),
    )


def launch_train(
    overrides: Sequence[str], cache_dir: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """`python src/train.py OVERRIDES` started, not awaited (stdout and stderr in one pipe)."""
    check_markers(overrides)
    return subprocess.Popen(
        [sys.executable, str(TRAIN), *overrides],
        env=train_env(cache_dir, env),
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


class lazy_import:
    """A module imported on first attribute access: ``transformers = lazy_import("transformers")``
    keeps a file's tests that never touch it free of it, and a test that does touch it fails
    (ModuleNotFoundError) when it is missing, instead of the whole file being skipped."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

"""Shared fixtures: offline W&B in a temporary directory, a private cache, default dtype restored."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    wandb_dir = tmp_path_factory.mktemp("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(wandb_dir / "cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """One cache (built-in tokenizer, token files) for the whole session: LLAMALAB_CACHE if set."""
    path = Path(os.environ.get("LLAMALAB_CACHE", REPO / ".cache" / "llamalab-test"))
    path.mkdir(parents=True, exist_ok=True)
    return path

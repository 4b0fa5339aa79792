"""Shared fixtures: offline W&B in a temporary directory, a private cache, default dtype restored,
the small tokenizer and the tiny RLHF checkpoints used by several files; and the hook that lets
``helpers.run_train`` check the running test's markers (README, "Tests")."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import helpers
import pytest
import torch
from helpers.data import small_tokenizer
from helpers.rlhf import make_policy, make_reward_model

from llamalab.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests are skipped, visibly, where there is no CUDA device."""
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


@pytest.hookimpl(tryfirst=True, wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """Record the running test before its fixtures (module- and session-scoped ones included) are
    built, so a fixture that runs ``src/train.py`` is checked against the test that needs it;
    unset again after each phase."""
    return (yield from _running(item))


@pytest.hookimpl(tryfirst=True, wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    return (yield from _running(item))


def _running(item: pytest.Item) -> Iterator[None]:
    helpers.current_item = item
    try:
        return (yield)
    finally:
        helpers.current_item = None


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


@pytest.fixture(scope="session")
def small_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The 512-piece tokenizer of ``helpers.data.small_tokenizer`` (trained once per session)."""
    return small_tokenizer(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory, small_tok: Tokenizer) -> dict:
    """Read-only tiny checkpoints with ``small_tok`` (``helpers.rlhf``): ``sft``, a random
    policy (SFT / reward / PPO init), and ``rm``, the good-token reward model; ``tokenizer``."""
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    return {
        "tokenizer": small_tok,
        "sft": make_policy(root / "sft", small_tok),
        "rm": make_reward_model(root / "rm", small_tok),
    }

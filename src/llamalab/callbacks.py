"""Callbacks every run gets, whatever `callbacks=` says."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig


def default_callbacks(cfg: DictConfig) -> list[Any]:
    """Nothing mandatory yet beyond what the callbacks group configures."""
    return []

"""Callbacks every run gets, whatever `callbacks=` says."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig


def default_callbacks(cfg: DictConfig) -> list[Any]:
    """W&B tracking (resolved config, tokens-seen x-axis, sample tables) when W&B is configured."""
    from llamalab.tracking import tracking_callbacks

    return [*tracking_callbacks(cfg)]

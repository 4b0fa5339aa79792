"""Lightning strategies from the `strategy=` config group, and the export at the end of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def build_strategy(strategy_cfg: DictConfig, cfg: DictConfig | None = None) -> Any:
    """``auto`` -> Lightning's choice; otherwise the configured strategy object."""
    if strategy_cfg.get("name", "auto") == "auto" or "_target_" not in strategy_cfg:
        return "auto"
    kwargs = OmegaConf.to_container(strategy_cfg, resolve=True)
    assert isinstance(kwargs, dict)
    kwargs.pop("name", None)
    return instantiate(kwargs, _convert_="all")


def export_from_trainer(trainer: Any, module: Any, path: Path) -> Path | None:
    """Write the Hugging Face export from rank 0 (every rank must call this)."""
    if trainer.is_global_zero:
        module.export(path)
    trainer.strategy.barrier("llamalab-export")
    return path if trainer.is_global_zero else None

"""Experiment tracking: W&B online when the user is logged in, offline otherwise.

Offline runs are written under the run directory (``<run>/wandb/offline-run-*``) and can be
uploaded later with ``wandb sync <dir>``; nothing in the code changes between the two modes.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def wandb_logged_in() -> bool:
    """An API key in the environment or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(str(Path.home() / ".netrc"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
    return rc.authenticators(host) is not None


def wandb_kwargs(cfg: DictConfig, logger_cfg: DictConfig) -> dict[str, Any]:
    """Mode and the full resolved config for ``WandbLogger``."""
    kwargs: dict[str, Any] = {"config": OmegaConf.to_container(cfg, resolve=True)}
    mode = os.environ.get("WANDB_MODE")
    if logger_cfg.get("offline") is None:
        kwargs["offline"] = mode in ("offline", "dryrun") or (mode != "online" and not wandb_logged_in())
    group = sweep_group(cfg)
    if group:
        kwargs["group"] = group
    return kwargs


def sweep_group(cfg: DictConfig) -> str | None:
    """In a Hydra multirun every job of the sweep shares one W&B group (the sweep directory)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    return f"sweep-{Path(hc.sweep.dir).name}-{cfg.stage.run_name}"

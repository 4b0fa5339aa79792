"""Where a run lives: its directory, the ``latest`` link of its run name, its ``export/``.

Each run lives in ``<outputs_root>/<run name>/<timestamp>/`` (or ``paths.output_dir=DIR``);
``<outputs_root>/<run name>/latest`` points to the newest finished one, which is how the next
stage finds it (:mod:`llamalab.pipeline`).
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

_STARTED = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
EXPORT = "export"  # <run dir>/export: the Hugging Face export every stage ends with


def _run_dir(output_dir: Any, outputs_root: str, run_name: str) -> str:
    """``paths.output_dir`` when given, else ``outputs/<stage>/<timestamp>``."""
    if output_dir not in (None, "", "None", "null"):
        return str(output_dir)
    return f"{outputs_root}/{run_name}/{_STARTED}"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("run_dir", _run_dir, replace=True)


def output_dir() -> Path:
    """This run's directory (Hydra's run directory, shared by every DDP rank)."""
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # no Hydra (a test calling train() with a composed config)
        return Path(os.getcwd())


def export_dir(run_dir: str | Path) -> Path:
    """Where a run writes its Hugging Face export."""
    return Path(run_dir) / EXPORT


def resolve_export_dir(path: str | Path) -> Path:
    """A run directory (or its ``latest`` link) -> its ``export/``; other paths unchanged."""
    p = Path(path)
    if (export_dir(p) / "config.json").exists():
        return export_dir(p)
    return p


def link_latest(cfg: DictConfig, out: Path) -> None:
    """Point ``outputs/<stage>/latest`` at this run (a relative symlink, replaced atomically)."""
    root = Path(cfg.paths.outputs_root).resolve()
    out = out.resolve()
    if root not in out.parents:
        return  # runs put elsewhere with paths.output_dir do not move `latest`
    stage_root = root / cfg.stage.run_name
    stage_root.mkdir(parents=True, exist_ok=True)
    link = stage_root / "latest"
    tmp = stage_root / f".latest.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(out, stage_root))
    os.replace(tmp, link)

"""Where a run lives: its directory, the ``latest`` link of its run name, its ``export/``.

Each run lives in ``<outputs_root>/<run name>/<launch name>/`` (or ``paths.output_dir=DIR``);
``<outputs_root>/<run name>/latest`` points to the newest finished one, which is how the next
stage finds it (:mod:`llamalab.pipeline`).

Every rank of a launch must land in the same directory, or ``ckpt_path=auto`` would resume
from different places on different ranks. Hydra picks the directory before any process group
exists, so the name is derived from what all ranks of one launch share (:func:`launch_name`):

1. ``paths.output_dir`` when given;
2. ``$LLAMALAB_RUN_ID`` (any launcher can set it for all ranks): ``<run id>``;
3. a SLURM job (batch or ``srun``): ``slurm-<job id>`` (``slurm-<array job>_<task>`` for an
   array). A requeued job keeps its id, so it finds its own checkpoints again;
4. ``torchrun``: ``torchrun-<rdzv id>`` (``TORCHELASTIC_RUN_ID``, which torchrun gives every
   rank and keeps across its restarts; its default ``none`` is not an id);
5. otherwise the time rank 0 started, ``%Y-%m-%d_%H-%M-%S``. Only rank 0 is started by the user
   then: Lightning's own launcher (``trainer.devices=N``) re-runs the command for the other
   ranks with ``hydra.run.dir`` set to rank 0's directory.

A process that is one of several ranks started independently (``WORLD_SIZE`` > 1 in its
environment) with none of 1-4 stops with a message before Hydra makes any directory
(:func:`check_launch`, called by ``src/train.py``): its timestamp could differ from the others'.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from llamalab.model.config import ConfigError

_STARTED = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
EXPORT = "export"  # <run dir>/export: the Hugging Face export every stage ends with
RUN_ID_ENV = "LLAMALAB_RUN_ID"  # a launch's name, shared by all its ranks (set by a launcher)
_SLURM_INTERACTIVE = (
    "bash",
    "interactive",
)  # salloc shells: no batch job to resume (Lightning's rule)


def _clean(name: str) -> str:
    """A launch id as one path component (no separators, nothing hidden)."""
    return re.sub(r"[^A-Za-z0-9._=-]", "_", name).lstrip(".") or "_"


def launch_name(env: Mapping[str, str] | None = None) -> str | None:
    """The run directory's name that every rank of this launch derives alike (rules 2-4 of the
    module docstring), or None when the launch has no such id."""
    env = os.environ if env is None else env
    if env.get(RUN_ID_ENV):
        return _clean(env[RUN_ID_ENV])
    if env.get("SLURM_JOB_ID") and env.get("SLURM_JOB_NAME") not in _SLURM_INTERACTIVE:
        array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
        job = f"{array}_{task}" if array and task else env["SLURM_JOB_ID"]
        return _clean(f"slurm-{job}")
    elastic = env.get("TORCHELASTIC_RUN_ID")
    if elastic and elastic != "none":
        return _clean(f"torchrun-{elastic}")
    return None


def started_independently(env: Mapping[str, str] | None = None) -> bool:
    """True in a process that an outside launcher started as one rank of several (torchrun,
    ``srun``, mpirun...): ``WORLD_SIZE`` > 1 before any process group exists."""
    env = os.environ if env is None else env
    try:
        return int(env.get("WORLD_SIZE") or 1) > 1
    except ValueError:
        return False


def run_dir_name(env: Mapping[str, str] | None = None, started: str = _STARTED) -> str:
    """The launch's directory name under ``<outputs_root>/<run name>/`` (module docstring)."""
    name = launch_name(env)
    return started if name is None else name


def check_launch(argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
    """Stop a rank started independently (``WORLD_SIZE`` > 1) that could not find the shared
    run directory: nothing names the launch and the command line sets no directory."""
    given = ("paths.output_dir=", "hydra.run.dir=", "-m", "--multirun")
    if launch_name(env) is not None or not started_independently(env):
        return
    if any(arg.startswith(given) and arg.split("=", 1)[-1] not in ("", "null") for arg in argv):
        return
    raise ConfigError(
        "this process is one rank of several started by a launcher (WORLD_SIZE > 1) and nothing "
        "names the launch for all ranks, so each would stamp its own run directory: set "
        f"paths.output_dir=DIR, or {RUN_ID_ENV} for every rank, or torchrun --rdzv-id=ID"
    )


def _run_dir(output_dir: Any, outputs_root: str, run_name: str) -> str:
    """``paths.output_dir`` when given, else ``<outputs_root>/<run name>/<launch name>``."""
    if output_dir not in (None, "", "None", "null"):
        return str(output_dir)
    return f"{outputs_root}/{run_name}/{run_dir_name()}"


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

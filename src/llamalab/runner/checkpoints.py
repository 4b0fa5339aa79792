"""The runner's checkpoint I/O: crash-safe checkpoint files, finding the checkpoint to resume
from, refusing one that does not belong to this run, and the Hugging Face export every stage
ends with.

A run may be killed at any instant (SIGKILL, OOM killer, node failure). What it has written must
survive that: every checkpoint file is written under a temporary name in the same folder,
flushed to disk and renamed into place (``os.replace`` is atomic on POSIX), so a kill mid-write
leaves the previous file intact and only a ``*.tmp-<pid>`` partial behind, which the next launch
removes. Sharded checkpoints (DeepSpeed, FSDP) are directories that every rank writes: they go
to a fresh ``<name>.partial-<token>`` directory that rank 0 renames into place once every rank
has finished (:mod:`llamalab.checkpoint.commit`, used by the strategies in :mod:`llamalab.scale`);
``ckpt_path=auto`` only ever sees committed names. ``checkpoints/last.ckpt`` is a link to the
newest periodic checkpoint (``save_last: link``), a full save only when it is the sole copy of
its step (a preemption save, or a run that saved nothing else). The callbacks that save on
SIGTERM/SIGUSR1/SIGUSR2 and carry RNG states, and the fit that ends a preempted run, live in
:mod:`llamalab.runner.callbacks`; the failure-mode table is ``docs/reliability.md``.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

from llamalab.checkpoint import CheckpointError
from llamalab.checkpoint.commit import (
    PARTIAL_DIR,
    commit,
    fsync_dir,
    interrupted_commits,
    is_committed_name,
    recover,
)
from llamalab.checkpoint.shards import DEFAULT_MAX_SHARD_SIZE
from llamalab.model import LlamaConfig
from llamalab.scale.build import is_rank_zero, sharding_mode
from llamalab.scale.wrap import uncompiled
from llamalab.scale.zero_gen import host_tensors, settle_zero3

log = logging.getLogger("llamalab")

PARTIAL = ".tmp-"  # <final name>.tmp-<pid>: a write in progress (or killed)
# Test hook: every checkpoint write pauses this many seconds halfway (after its first bytes
# reach the disk), so a test can SIGKILL the process mid-write. Unset in real runs.
WRITE_DELAY_ENV = "LLAMALAB_TEST_CKPT_WRITE_DELAY"
RESUME_KEYWORDS = ("last", "auto")


class MissingCheckpointError(FileNotFoundError):
    """``ckpt_path`` names a checkpoint that does not exist."""


# ---------------------------------------------------------------------------- atomic files
def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through ``write(f)`` to ``<path>.tmp-<pid>``, fsync, rename onto ``path``.

    A process killed at any point leaves either the old ``path`` or the new one, never a torn
    file. On an exception the partial file is removed and the exception re-raised.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}{PARTIAL}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            delay = os.environ.get(WRITE_DELAY_ENV)
            write(cast(IO[bytes], _SlowWriter(f, float(delay))) if delay else f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
    return final


class _SlowWriter:
    """A file wrapper that pauses once, after its first write reached the disk (test hook)."""

    def __init__(self, f: Any, delay: float) -> None:
        self.f, self.delay, self.paused = f, delay, False

    def write(self, data: bytes) -> int:
        n = self.f.write(data)
        if not self.paused:
            self.paused = True
            self.f.flush()
            os.fsync(self.f.fileno())
            time.sleep(self.delay)
        return n

    def flush(self) -> None:
        self.f.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with crash-safe writes (:func:`atomic_write`).

    Lightning's own ``TorchCheckpointIO`` serialises the whole checkpoint into memory and moves
    a temporary file from the system temp dir into place: twice the checkpoint in RAM, no
    fsync, and a copy (not an atomic rename) when /tmp is another filesystem. Here the stream
    goes straight to a file beside the target. Used for checkpoints written as one file (single
    device, DDP); DeepSpeed and FSDP write directories through their own code (see
    :func:`checkpoint_plugins`).
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def checkpoint_plugins(strategy: Any) -> list[Any]:
    """``[AtomicCheckpointIO()]`` for strategies that save one file through Lightning's
    checkpoint IO (``auto``, single device, DDP); ``[]`` for DeepSpeed / FSDP / model-parallel,
    which write sharded directories themselves (docs/reliability.md: their crash safety)."""
    if isinstance(strategy, str):
        return [AtomicCheckpointIO()] if strategy in ("auto", "ddp", "single_device") else []
    if isinstance(strategy, DeepSpeedStrategy):
        return []
    if isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)):
        return [AtomicCheckpointIO()]
    return []


class AtomicModelCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (``callbacks.model_checkpoint``) whose ``last`` link
    replaces the previous ``last`` in one rename. Lightning deletes the old ``last`` first and
    links after: a crash in between left no ``last``, and one during the deletion of a sharded
    ``last.ckpt`` directory (a preemption save) a torn directory under a committed name."""

    @staticmethod
    def _link_checkpoint(trainer: Any, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            link = Path(linkpath)
            fresh = link.with_name(f"{link.name}{PARTIAL_DIR}{uuid.uuid4().hex[:12]}")
            fresh.symlink_to(os.path.relpath(filepath, link.parent))
            commit(fresh, link)
        trainer.strategy.barrier()


# ---------------------------------------------------------------------------- finding a resume point
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_partial_writes(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete ``*.tmp-<pid>`` leftovers of writers that are no longer running; returns them."""
    root = Path(folder)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for path in root.glob(f"*{PARTIAL}*"):
        pid = path.name.rsplit(PARTIAL, 1)[1]
        if pid.isdigit() and not _pid_alive(int(pid)) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.warning("removed %d partial checkpoint write(s) of a killed run: %s",
                    len(removed), ", ".join(p.name for p in removed))  # fmt: skip
    return removed


def is_complete_checkpoint(path: Path) -> bool:
    """A file checkpoint is a readable zip (torch.save's format: its directory sits at the end,
    so a torn file fails); a sharded directory has its index (``.metadata`` for torch
    distributed checkpoints, ``latest`` for DeepSpeed)."""
    if path.is_file():
        return zipfile.is_zipfile(path)
    if path.is_dir():
        return (path / ".metadata").exists() or (path / "latest").exists()
    return False


def saved_at(path: Path) -> float:
    """When a checkpoint was saved: a file's mtime; for a sharded directory, the mtime of the
    index its save wrote (DeepSpeed's ``latest``, DCP's ``.metadata``), because later additions
    to the directory (the universal copy of :mod:`llamalab.runner.reshard`) change its own."""
    if path.is_dir():
        for marker in ("latest", ".metadata"):
            if (path / marker).exists():
                return (path / marker).stat().st_mtime
    return path.stat().st_mtime


def resume_candidates(out_dir: Path) -> list[Path]:
    """Checkpoints of the run in ``out_dir``, newest first: ``checkpoints/*.ckpt`` (``last``,
    periodic, preemption) and Lightning's SLURM ``hpc_ckpt_*.ckpt``. A link (``last.ckpt``)
    counts as its target, a dangling one not at all; a name whose commit a crash interrupted
    counts with its previous version (which rank 0 puts back, :func:`find_resume_checkpoint`)."""
    folder = out_dir / "checkpoints"
    dated: dict[Path, float] = {}
    for path in [*folder.glob("*.ckpt"), *out_dir.glob("hpc_ckpt_*.ckpt")]:
        if not is_committed_name(path) or not path.exists():  # a dangling link: skip it
            continue
        target = Path(os.path.realpath(path)) if path.is_symlink() else path
        dated[target] = saved_at(target)
    for name in interrupted_commits(folder):
        olds = sorted(folder.glob(f"{name.name}.old-*"))
        if olds and name.suffix == ".ckpt":
            dated[name] = olds[-1].stat().st_mtime
    return sorted(dated, key=lambda p: dated[p], reverse=True)


def find_resume_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of the run in ``out_dir`` (torn files skipped with a
    warning), or None. First the leftovers of a killed run go: ``*.tmp-<pid>`` files of dead
    writers (any rank), and on rank 0 uncommitted sharded saves (:func:`recover`). The answer
    does not depend on whether rank 0 has cleaned up yet, so every rank finds the same one."""
    out = Path(out_dir)
    remove_partial_writes(out / "checkpoints")
    remove_partial_writes(out)
    if is_rank_zero():
        recover(out / "checkpoints")
    for path in resume_candidates(out):
        if not path.exists() or is_complete_checkpoint(path):  # not yet put back by rank 0
            return path
        log.warning("skipping %s: incomplete or unreadable checkpoint", path)
    return None


def resolve_ckpt_path(value: Any, out_dir: str | os.PathLike[str]) -> str | None:
    """``ckpt_path`` as given by the user -> the file to resume from (or None = fresh start).

    - ``null``: a fresh start (Lightning still resumes a SLURM ``hpc_ckpt`` by itself);
    - ``auto``: the newest complete checkpoint in this run's directory if any, else a fresh
      start (for launch scripts that requeue the same command);
    - ``last``: the same, but it must exist;
    - a path: it must exist and be complete.
    """
    if value in (None, "", "null", "None"):
        return None
    out = Path(out_dir)
    if value in RESUME_KEYWORDS:
        found = find_resume_checkpoint(out)
        if found is None and value == "last":
            raise MissingCheckpointError(
                f"ckpt_path=last: no checkpoint in {out / 'checkpoints'}. Resume a run by giving "
                "its directory (paths.output_dir=DIR) or a checkpoint file (ckpt_path=FILE); "
                "ckpt_path=auto starts fresh when there is none"
            )
        if found is None:
            log.info("ckpt_path=auto: no checkpoint in %s, starting from the beginning", out)
            return None
        log.info("resuming from %s", found)
        return str(found)
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise MissingCheckpointError(f"ckpt_path={value} does not exist")
    if not is_committed_name(path):
        raise CheckpointError(
            f"ckpt_path={value} is a checkpoint whose save never finished on every rank, or one "
            "being replaced or deleted: pass a committed one (its name ends in .ckpt), or "
            "ckpt_path=auto for the newest of the run in paths.output_dir"
        )
    if not is_complete_checkpoint(path):
        raise CheckpointError(
            f"ckpt_path={value} is not a complete checkpoint (truncated, or not written by "
            "Lightning): pass an earlier one from its folder, or ckpt_path=auto for the newest "
            "complete checkpoint of the run in paths.output_dir"
        )
    return str(path)


def check_resume_checkpoint(path: str | os.PathLike[str], arch: LlamaConfig, stage: str) -> None:
    """Refuse, before any model is built, a checkpoint of another stage or architecture.

    Reads the ``checkpoint["llamalab"]`` header (docs/interfaces.md) with ``mmap`` (no weights
    are read); directories (DeepSpeed / FSDP) are checked later, tensor by tensor.
    """
    p = Path(path)
    if not p.is_file():
        return
    try:
        ckpt = torch.load(p, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:
        raise CheckpointError(f"ckpt_path={p} cannot be read: {err}") from err
    meta = ckpt.get("llamalab") if isinstance(ckpt, dict) else None
    if meta is None:
        raise CheckpointError(
            f"ckpt_path={p} is not a llamalab training checkpoint (no 'llamalab' header); to "
            "start from other weights use stage.init instead"
        )
    if meta.get("stage", stage) != stage:
        raise CheckpointError(
            f"ckpt_path={p} was written by stage '{meta['stage']}', this is stage '{stage}': "
            f"resume a run with its own stage, or start '{stage}' from it with stage.init"
        )
    saved = meta.get("model_config", {})
    ours = arch.to_dict()
    diffs = [
        f"{k}={saved[k]!r} (this run: {ours.get(k)!r})" for k in saved if saved[k] != ours.get(k)
    ]
    if diffs:
        raise CheckpointError(
            f"ckpt_path={p} holds another architecture: "
            + ", ".join(diffs)
            + "; resume with the model settings it was trained with"
        )


# ---------------------------------------------------------------------------- the export
def export_from_trainer(
    trainer: Any, module: Any, path: Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> Path | None:
    """Write the Hugging Face export from rank 0 (every rank must call this).

    The weights stream from the model to safetensors shards of at most ``max_shard_size``
    (``export.max_shard_size``): under ZeRO-3 / FSDP every rank takes part in gathering one unit
    at a time, rank 0 copies each gathered unit to host memory and writes a shard whenever one
    is full (:func:`llamalab.scale.zero_gen.host_tensors`). Nothing is cloned on the device,
    and host memory holds about one shard plus one unit, never the model.
    """
    mode = sharding_mode(trainer.strategy)
    settle_zero3(trainer.strategy)
    model = uncompiled(module.export_model())
    tensors = host_tensors(model, mode, keep=trainer.is_global_zero)
    try:
        if trainer.is_global_zero:
            module.export(path, model=model, tensors=tensors, max_shard_size=max_shard_size)
    finally:
        for _ in tensors:  # the other ranks' gathers (or rank 0's, after an error) run to the end
            pass
    trainer.strategy.barrier("llamalab-export")
    return path if trainer.is_global_zero else None

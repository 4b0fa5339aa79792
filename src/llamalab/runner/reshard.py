"""Resuming a run on another number of ranks (``trainer.devices`` x ``trainer.num_nodes``).

Three things depend on the world size that wrote a checkpoint, and each is carried over here or
in the data modules:

- **Optimizer state partitions.** A ZeRO checkpoint holds one optimizer partition per
  data-parallel rank, and DeepSpeed refuses to load it into another number of ranks ("The
  checkpoint being loaded used a DP world size of 2 but the current world size is 1"). When the
  counts differ, rank 0 converts the checkpoint once into DeepSpeed's *universal* format
  (``deepspeed.checkpoint.ds_to_universal``: one folder per parameter with its fp32 weights and
  Adam moments), cached beside it as ``<ckpt>/<tag>_universal`` and committed by an atomic
  rename; every rank then loads it with ``"checkpoint": {"load_universal": true}``, and each
  parameter group's settings and Adam step are put right after the load
  (:func:`repair_universal_load`). FSDP2 checkpoints (``torch.distributed.checkpoint``) are
  resharded by torch on load and need nothing; single-file checkpoints (one process, DDP) hold
  the whole state.
- **Lightning's batch counters.** They count micro-batches *per rank* in the epoch, and they
  decide where gradient accumulation ends, where the epoch ends and what the data position is
  at the next save. :class:`WorldSizeChange` records the world size and micro-batch of every
  checkpoint and, on a resume with other ones, rescales the counters to the new ranks' units
  (``processed x old world x old micro-batch / (new world x new micro-batch)``), so the new run
  steps on the same global batches as the old one would have.
- **The data order.** The samplers skip the *global* prefix of the epoch's permutation that the
  old world consumed and deal the rest over the new ranks (``llamalab.data.pretrain``,
  ``llamalab.data.sampling``).

The runner adds one :class:`WorldSizeChange` to every run (``runner/run.py``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy

from llamalab.checkpoint import CheckpointError
from llamalab.runner.checkpoints import PARTIAL, atomic_write, fsync_dir

log = logging.getLogger("llamalab")

UNIVERSAL = "_universal"  # <ckpt>/<tag>_universal: the converted copy of <ckpt>/<tag>
STAMP = "llamalab_source.json"  # inside the universal copy: which source files it was made from
LATEST_UNIVERSAL = "latest_universal"  # DeepSpeed reads the universal tag from this file
# A conversion of 70B (about 840 GB of fp32 weights and moments) can outlast the default 30-min
# collective timeout: the other ranks wait for rank 0 on a side group with this one.
CONVERT_TIMEOUT = _dt.timedelta(hours=6)
_DP_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
_DCP_RANK = re.compile(r"^__(\d+)_\d+\.distcp$")  # torch.distributed.checkpoint: one per rank


class ReshardError(CheckpointError):
    """A checkpoint could not be converted for another world size."""


# ---------------------------------------------------------------------------- DeepSpeed files
def deepspeed_tag(path: Path) -> str | None:
    """The tag (sub-folder) a DeepSpeed checkpoint directory's ``latest`` names, or None."""
    latest = path / "latest"
    return latest.read_text().strip() if path.is_dir() and latest.is_file() else None


def saved_dp_world(path: str | Path) -> int | None:
    """Data-parallel ranks that wrote a DeepSpeed checkpoint directory: the number of distinct
    ranks among its ``*zero_pp_rank_<r>_mp_rank_<m>_optim_states.pt`` partitions (None when
    ``path`` is not a DeepSpeed checkpoint with optimizer partitions)."""
    root = Path(path)
    tag = deepspeed_tag(root)
    if tag is None:
        return None
    ranks = {int(m.group(1)) for f in (root / tag).iterdir() if (m := _DP_RANK.search(f.name))}
    return len(ranks) or None


def saved_world(path: str | Path) -> int | None:
    """Ranks that wrote a sharded checkpoint directory (DeepSpeed partitions, or the
    ``__<rank>_<n>.distcp`` files of a torch distributed checkpoint); None for a single file."""
    root = Path(path)
    if not root.is_dir():
        return None
    ranks = {int(m.group(1)) for f in root.iterdir() if (m := _DCP_RANK.match(f.name))}
    return len(ranks) or saved_dp_world(root)


def source_stamp(folder: Path) -> dict[str, list[int]]:
    """``{file name: [size, mtime_ns]}`` of a checkpoint tag's files: a cached conversion is
    reused only while the files it was made from are unchanged (``last.ckpt`` is rewritten in
    place by every save)."""
    return {
        f.name: [f.stat().st_size, f.stat().st_mtime_ns]
        for f in sorted(folder.iterdir())
        if f.is_file()
    }


def cached_universal(path: Path, tag: str) -> Path | None:
    """``<path>/<tag>_universal`` when it was converted from the current ``<path>/<tag>``."""
    target = path / f"{tag}{UNIVERSAL}"
    try:
        stamp = json.loads((target / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return target if stamp == source_stamp(path / tag) else None


def to_universal(path: str | Path) -> Path:
    """Convert the DeepSpeed checkpoint in ``path`` to the universal format (rank 0 only).

    Writes ``<path>/<tag>_universal.tmp-<pid>`` with DeepSpeed's converter (one worker: no
    process pool), stamps it with its source files, renames it to ``<path>/<tag>_universal`` and
    points ``<path>/latest_universal`` at it. A kill at any moment leaves either no universal
    copy (the next resume converts again) or a complete one. Reuses a current cached copy.
    """
    root = Path(path)
    tag = deepspeed_tag(root)
    if tag is None:
        raise ReshardError(f"{root} is not a DeepSpeed checkpoint (no 'latest' file)")
    target = cached_universal(root, tag)
    if target is None:
        target = root / f"{tag}{UNIVERSAL}"
        for stale in (target, *root.glob(f"{tag}{UNIVERSAL}{PARTIAL}*")):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f"{target.name}{PARTIAL}{os.getpid()}"
        command = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
            "--input_folder", str(root / tag), "--output_folder", str(tmp),
            "--num_extract_workers", "1", "--num_merge_workers", "1",
            "--inject_missing_state",  # ZeRO-1/2 files lack the Megatron-only info block
        ]  # fmt: skip
        log.info("converting %s to a universal checkpoint for another world size", root / tag)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ReshardError(
                f"DeepSpeed could not convert {root / tag} to a universal checkpoint "
                f"(`{' '.join(command[1:])}` exited {done.returncode}):\n"
                + (done.stdout + done.stderr)[-3000:]
            )
        (tmp / STAMP).write_text(json.dumps(source_stamp(root / tag)))
        tmp.replace(target)
        fsync_dir(root)
    atomic_write(root / LATEST_UNIVERSAL, lambda f: f.write(target.name.encode()))
    return target


def _on_rank_zero_then_all(trainer: L.Trainer, work: Any) -> None:
    """Run ``work()`` on global rank 0 while the other ranks wait; a failure there is raised on
    every rank. The wait uses a gloo side group with :data:`CONVERT_TIMEOUT` (the default
    group's timeout is too short for a large conversion)."""
    if trainer.world_size == 1 or not dist.is_initialized():
        work()
        return
    group = dist.new_group(backend="gloo", timeout=CONVERT_TIMEOUT)
    message: list[str | None] = [None]
    error: Exception | None = None
    if trainer.is_global_zero:
        try:
            work()
        except Exception as err:  # told to every rank below, then raised here as it is
            error, message[0] = err, f"{type(err).__name__}: {err}"
    dist.broadcast_object_list(message, src=0, group=group)
    dist.destroy_process_group(group)
    if error is not None:
        raise error
    if message[0] is not None:
        raise ReshardError(f"rank 0 failed to convert the checkpoint: {message[0]}")


# ---------------------------------------------------------------------------- the callback
class WorldSizeChange(Callback):
    """Records the world size and micro-batch of every checkpoint; on resuming with other
    ones, converts a ZeRO checkpoint to the universal format (before DeepSpeed is initialised)
    and rescales Lightning's per-rank batch counters (before the first batch).

    Args:
        ckpt_path: the checkpoint this run resumes from (None = a fresh start).
    """

    def __init__(self, ckpt_path: str | None) -> None:
        self.ckpt_path = ckpt_path
        # what wrote the checkpoint: its files tell the world size (a checkpoint written before
        # this callback existed), the callback's own state tells both
        self.saved: dict[str, int] = {}
        self._trainer: L.Trainer | None = None
        self._universal: Path | None = None  # the universal copy this run loads, if any

    @property
    def state_key(self) -> str:
        return "llamalab.WorldSizeChange"

    def state_dict(self) -> dict[str, Any]:
        if self._trainer is None:
            return dict(self.saved)
        return {"world_size": self._trainer.world_size, "micro_batch": _micro_batch(self._trainer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved.update({k: int(v) for k, v in state_dict.items()})

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage != "fit" or self.ckpt_path is None:
            return
        saved = saved_world(self.ckpt_path)
        if saved is not None:
            self.saved["world_size"] = saved
        strategy = trainer.strategy
        if not isinstance(strategy, DeepSpeedStrategy) or saved_dp_world(self.ckpt_path) in (
            None,
            trainer.world_size,
        ):
            return
        log.info(
            "ckpt_path=%s was written by %d ranks, this run has %d: loading its universal form",
            self.ckpt_path, saved, trainer.world_size,
        )  # fmt: skip
        _on_rank_zero_then_all(trainer, lambda: to_universal(str(self.ckpt_path)))
        strategy.config.setdefault("checkpoint", {})["load_universal"] = True
        root = Path(self.ckpt_path)
        self._universal = root / (root / LATEST_UNIVERSAL).read_text().strip()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After Lightning restored the checkpoint, before the epoch loop resumes: repair a
        universal load (:func:`repair_universal_load`), rescale the batch counters."""
        if self._universal is not None:
            repair_universal_load(trainer.optimizers, self._universal)
        if self.ckpt_path is None or "world_size" not in self.saved:
            return
        old = self.saved["world_size"] * self.saved.get("micro_batch", _micro_batch(trainer))
        new = trainer.world_size * _micro_batch(trainer)
        if old != new:
            rescale_batch_progress(trainer.fit_loop.epoch_loop.batch_progress, Fraction(old, new))
            log.info(
                "resumed on %d ranks from a checkpoint of %d: per-rank batch counters scaled "
                "by %s", trainer.world_size, self.saved["world_size"], Fraction(old, new),
            )  # fmt: skip


def _micro_batch(trainer: L.Trainer) -> int:
    """Rows per rank per training batch (the datamodule's ``batch_size``; 1 when unknown)."""
    return int(getattr(trainer.datamodule, "batch_size", 1) or 1)


def repair_universal_load(optimizers: list[Any], universal: Path) -> None:
    """Undo what DeepSpeed's universal ZeRO-3 load (0.19.8) gets wrong with several parameter
    groups (ours: no weight decay on norms; PPO's critic has its own learning rate):

    - it copies the first group's settings (lr, weight decay, betas...) into every group
      ("the hyperparameters of each parameter should be the same"): each group gets its own
      back from the converted ``optimizer_state.pt``, which keeps them all;
    - it gives every group's Adam state the *same* ``step`` tensor, which torch's AdamW then
      increments once per group at each step (2 groups: 1, 3, 5...; wrong bias correction):
      each group gets its own copy.
    """
    common = torch.load(universal / "zero" / "optimizer_state.pt", weights_only=False)
    saved = common["optimizer_state_dict"]["param_groups"]
    groups = optimizers[0].param_groups if len(optimizers) == 1 else []
    if len(saved) != len(groups):
        raise ReshardError(
            f"{universal} holds {len(saved)} optimizer parameter groups, this run has "
            f"{len(groups)}: resume with the stage settings the checkpoint was trained with"
        )
    for group, values in zip(groups, saved, strict=True):
        group.update({k: v for k, v in values.items() if k != "params"})
    # ZeRO's wrapper -> torch's AdamW, whose groups hold their flat partition only during a step
    inner = getattr(optimizers[0], "optimizer", optimizers[0])
    for state in inner.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def rescale_batch_progress(progress: Any, factor: Fraction) -> None:
    """Express Lightning's ``_BatchProgress`` (per-rank batches: ``total`` over the run,
    ``current`` in this epoch) in units ``factor`` times smaller: the batches done become
    ``floor(processed * factor)``, and every counter moves by the same amount, so the
    restart stage Lightning reads from their differences is kept. Rounding down means the
    new ranks' data runs out no later than Lightning's count of the epoch."""
    for tracker in (progress.total, progress.current):
        delta = int(tracker.processed * factor) - tracker.processed
        for name in ("ready", "started", "processed", "completed"):
            setattr(tracker, name, getattr(tracker, name) + delta)

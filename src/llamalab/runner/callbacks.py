"""Callbacks every run gets, whatever ``callbacks=`` says: W&B tracking, a checkpoint on
preemption, and the RNG states carried in every checkpoint (exact resume); and :func:`fit`,
which ends a preempted run with ``128 + signal`` once its checkpoint is saved, after asking
SLURM to requeue the job when the signal announced its time limit.

What each signal does (README, "Reliability"):

- SIGTERM (preemption, ``scancel``, Kubernetes), SIGUSR1 and SIGUSR2 (SLURM's ``--signal``
  warning before the time limit; submitit sends SIGUSR2): finish the current optimizer step, save
  ``checkpoints/last.ckpt``, stop, exit ``128 + signal`` (143, 138, 140);
- SIGUSR1 / SIGUSR2 in a SLURM batch job: before exiting, rank 0 requeues the job (a handler that
  a launcher installed for the signal, submitit's, does it instead; ``hydra/launcher=slurm``
  resubmits with ``ckpt_path=auto``). The requeued job keeps its id, hence its run directory
  (:mod:`llamalab.runner.paths`), and continues from ``last.ckpt`` with ``ckpt_path=auto``.
  SIGTERM requeues nothing: on preemption SLURM requeues by itself when configured to.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from llamalab.runner.paths import output_dir
from llamalab.runner.tracking import tracking_callbacks

log = logging.getLogger("llamalab")

# Debug/test hook: act as if SIGTERM arrived during optimizer step N (a deterministic way to
# practise a preemption and its resume; the schedule is unchanged, unlike trainer.max_steps=N).
PREEMPT_AT_STEP_ENV = "LLAMALAB_PREEMPT_AT_STEP"
# Debug/test hook: send this process a real SIGTERM when training micro-batch N (0-based, counted
# over the whole run) starts, e.g. in the middle of gradient accumulation. Unlike the hook above
# this goes through the signal handler, exactly like a scheduler's SIGTERM.
SIGNAL_AT_BATCH_ENV = "LLAMALAB_SIGNAL_AT_BATCH"
# ... and which signal it sends: TERM (the default), USR1 or USR2.
SIGNAL_ENV = "LLAMALAB_SIGNAL"

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# SLURM's warning before a time limit (`--signal=USR1@120`; submitit uses USR2): requeue the job.
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def default_callbacks(cfg: DictConfig) -> list[Any]:
    """W&B tracking (when W&B is configured), :class:`PreemptionCheckpoint` into
    ``<run dir>/checkpoints`` and :class:`RNGStateCheckpoint`."""
    return [
        *tracking_callbacks(cfg),
        PreemptionCheckpoint(output_dir() / "checkpoints"),
        RNGStateCheckpoint(),
    ]


# ---------------------------------------------------------------------------- preemption
def _accumulating(trainer: L.Trainer) -> bool:
    """True when the batch that just ended did not finish an optimizer step (its gradients
    would be lost by a checkpoint taken now)."""
    loop = trainer.fit_loop.epoch_loop
    should = getattr(loop, "_should_accumulate", None)
    return (
        bool(should())
        if callable(should) and trainer.lightning_module.automatic_optimization
        else False
    )


def slurm_job_id(env: Any = None) -> str | None:
    """The id ``scontrol requeue`` takes (``<array job>_<task>`` in an array), or None outside
    a SLURM batch job (an interactive ``salloc`` shell has nothing to requeue)."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID") or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else env["SLURM_JOB_ID"]
    return job if re.fullmatch(r"[0-9_]+", job) else None


def _auto_requeue(trainer: L.Trainer) -> bool:
    """Lightning's switch (``SLURMEnvironment(auto_requeue=False)`` turns requeueing off)."""
    env = trainer._accelerator_connector.cluster_environment
    return not isinstance(env, SLURMEnvironment) or bool(env.auto_requeue)


def requeue_slurm_job(job: str) -> bool:
    """``scontrol requeue JOB``; False (with a warning) when it fails."""
    try:
        done = subprocess.run(["scontrol", "requeue", job], timeout=60, check=False).returncode
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("could not requeue SLURM job %s: %s", job, err)
        return False
    if done != 0:
        log.warning("scontrol requeue %s failed with exit code %d", job, done)
        return False
    log.warning("requeued SLURM job %s: it continues from the saved checkpoint", job)
    return True


class PreemptionCheckpoint(Callback):
    """On SIGTERM, SIGUSR1 or SIGUSR2: finish the current step, save ``<dirpath>/last.ckpt``
    through the trainer (weights, optimizer, schedule, loops, data position, RNG states, stage
    state), and stop. :func:`fit` then exits with ``128 + signal``; the next launch
    with the same ``paths.output_dir`` and ``ckpt_path=last`` (or ``auto``) continues.

    - The save waits for an optimizer-step boundary: mid gradient accumulation, the gradients
      of the accumulated micro-batches are not in any checkpoint.
    - Under several ranks the decision is reduced over ranks at every batch end, so all ranks
      save the same step together (a signal that reaches one rank is enough).
    - The handlers are installed at ``setup`` and installed again at ``on_train_start``, on
      top of the handler Lightning registers in between. Lightning's SIGTERM handler forwards
      the signal to the launcher's children and runs a ``dist.broadcast`` inside the handler,
      which can pair with an unrelated collective of another rank; it would also raise
      ``SIGTERMException`` at the next batch, before this callback could save. From the first
      training batch on, a signal is only recorded, whatever the run is doing (validation
      included), and acted on at the next optimizer-step boundary. If Lightning's handler still
      ran (a signal before training starts), ``on_exception`` saves in a single process.
    - The Python handler SIGUSR1 / SIGUSR2 had before the run (a launcher's: submitit's
      checkpoint-and-requeue for SIGUSR2) is kept and called by :func:`fit` once the checkpoint is on disk
      (:meth:`after_stop`). Without one, a SIGUSR1 / SIGUSR2 in a SLURM batch job makes rank 0
      requeue the job. Lightning's own SLURM handler (``hpc_ckpt_N.ckpt`` written from inside
      the handler, in the middle of a step) is not used: ``ckpt_path=auto`` still finds such a
      checkpoint from an older run.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        signals: tuple[int, ...] = PREEMPTION_SIGNALS,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.signals = tuple(int(s) for s in signals)
        self.signum: int | None = None  # the signal that stopped the run (after its save)
        self.saved_path: str | None = None
        self._pending: int | None = None  # received, not yet acted on
        self._previous: dict[int, Any] = {}
        stop_at = os.environ.get(PREEMPT_AT_STEP_ENV)
        self._stop_at = int(stop_at) if stop_at else None
        signal_at = os.environ.get(SIGNAL_AT_BATCH_ENV)
        self._signal_at = int(signal_at) if signal_at else None
        sent = (os.environ.get(SIGNAL_ENV) or "TERM").upper().removeprefix("SIG")
        self._signal_sent = signal.Signals[f"SIG{sent}"]
        self._launcher_handlers: dict[int, Any] = {}  # what each signal did before the run
        self._requeue = True  # Lightning's SLURMEnvironment.auto_requeue, read at setup

    # ------------------------------------------------------------------ signal handlers
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)
        self._launcher_handlers = {
            s: h for s, h in self._previous.items() if callable(h) and s in REQUEUE_SIGNALS
        }
        self._requeue = _auto_requeue(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum in self._previous:  # take the handlers back from Lightning's (see above)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Only record it: the save happens between steps, never inside one."""
        if self._pending is None:
            self._pending = signum

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    # ------------------------------------------------------------------ the save
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._signal_at is None or not trainer.is_global_zero:
            return
        started = trainer.fit_loop.epoch_loop.batch_progress.total.started
        if started == self._signal_at:  # `started` counts the batches begun before this one
            os.kill(os.getpid(), self._signal_sent)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        simulated = self._stop_at is not None and trainer.global_step == self._stop_at
        requested = self._pending is not None or trainer.received_sigterm or simulated
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested or self.signum is not None:
            return
        if self._pending is None:
            self._pending = int(signal.SIGTERM)
        if hasattr(trainer, "_signal_connector"):
            trainer._signal_connector.received_sigterm = False  # we stop at the step boundary
        if _accumulating(trainer):
            return  # save after the optimizer step this micro-batch belongs to
        self.save(trainer)
        trainer.should_stop = True

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()
        if not isinstance(exception, SIGTERMException) or self.saved_path is not None:
            return
        if trainer.world_size > 1 or _accumulating(trainer):
            log.warning("SIGTERM at step %d could not be saved consistently; the last periodic "
                        "checkpoint in %s is kept", trainer.global_step, self.dirpath)  # fmt: skip
            return
        self._pending = self._pending or int(signal.SIGTERM)
        self.save(trainer)

    def _same_folder(self, callback: Any) -> bool:
        if not isinstance(callback, ModelCheckpoint) or not callback.save_last:
            return False
        folder = callback.dirpath
        return folder is not None and Path(folder).resolve() == self.dirpath.resolve()

    def save(self, trainer: L.Trainer) -> None:
        """``<dirpath>/last.ckpt`` through the trainer (all ranks call it), made ModelCheckpoint's
        ``last`` when it writes to the same folder (so its next ``last`` replaces this one)."""
        path = self.dirpath / "last.ckpt"
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and self._same_folder(callback):
                callback.last_model_path = str(path)
        trainer.save_checkpoint(str(path))
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                # ModelCheckpoint.on_train_end writes `last` when it has not saved one yet (no
                # periodic checkpoint so far). It would run after the fit loop has closed the
                # stopped epoch, so its `last.ckpt` would say "epoch 1, 5 batches done" where
                # ours says "epoch 0, 5 batches": the resume would then skip into the next
                # epoch's data order. Mark this step as saved so that nothing overwrites it.
                callback._last_checkpoint_saved = str(path)
                callback._last_global_step_saved = trainer.global_step
        self.saved_path, self.signum = str(path), self._pending
        if trainer.is_global_zero:
            name = signal.Signals(self.signum).name if self.signum else "preemption"
            log.warning(
                "%s: stopped after step %d and saved %s. Resume with the same command plus "
                "ckpt_path=last paths.output_dir=%s",
                name, trainer.global_step, path, self.dirpath.parent,
            )  # fmt: skip

    def after_stop(self, trainer: L.Trainer) -> None:
        """Once the checkpoint is saved and training stopped: run the handler a launcher had
        installed for the signal (submitit's requeues with ``ckpt_path=auto`` under
        ``hydra/launcher=slurm``), or else requeue the SLURM job from rank 0 on SIGUSR1 /
        SIGUSR2. A launcher handler that exits (submitit's does) leaves the exit code ours."""
        if self.signum is None:
            return
        handler = self._launcher_handlers.get(self.signum)
        if handler is not None:
            with contextlib.suppress(SystemExit):
                handler(self.signum, None)
            return
        job = slurm_job_id()
        if self.signum in REQUEUE_SIGNALS and job and self._requeue and trainer.is_global_zero:
            requeue_slurm_job(job)


# ---------------------------------------------------------------------------- the fit
class Preempted(SystemExit):
    """The run stopped on a preemption signal after saving its checkpoint; the process exits
    with ``128 + signal`` (143 for SIGTERM, 138 for SIGUSR1, 140 for SIGUSR2), like a process
    the signal killed,
    so launch scripts and schedulers see that it did not finish."""

    def __init__(self, signum: int, saved: str | None) -> None:
        super().__init__(128 + int(signum))
        self.signum, self.saved = int(signum), saved


def fit(trainer: Any, module: Any, datamodule: Any, ckpt_path: str | None) -> None:
    """``trainer.fit``; raises :class:`Preempted` when a preemption signal stopped it (after
    :class:`PreemptionCheckpoint` saved ``checkpoints/last.ckpt`` and, for a SLURM time limit,
    requeued the job: :meth:`PreemptionCheckpoint.after_stop`)."""
    callback = next((c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)), None)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning stopped before our callback could (see its docstring)
        saved = callback.saved_path if callback is not None else None
        raise Preempted(signal.SIGTERM, saved) from None
    if callback is not None and callback.signum is not None:
        callback.after_stop(trainer)
        raise Preempted(callback.signum, callback.saved_path)


# ---------------------------------------------------------------------------- RNG states
def collect_rng_states() -> dict[str, Any]:
    """The global RNG states of torch (CPU and every CUDA device), numpy and Python, as
    tensors and plain numbers (loadable with ``torch.load(weights_only=True)``)."""
    np_state: Any = np.random.get_state(legacy=True)  # (kind, keys, pos, has_gauss, gauss)
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }  # fmt: skip


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`collect_rng_states` (CUDA states only when the device count matches)."""
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class RNGStateCheckpoint(Callback):
    """Carry the global RNG states in every checkpoint; on resume, restore them just before the
    first training batch (where the uninterrupted run stood when the checkpoint was taken).

    Lightning restores weights, optimizer, schedulers and loops but not these states. Our
    stages draw their randomness from seeded generators (data order, PPO sampling), so this
    is what keeps anything else drawn from the global RNG (dropout in a user's model, a
    sampler without a generator) on the uninterrupted run's sequence. Every rank restores
    rank 0's states; ``seed_everything`` seeds all ranks alike, so they are equal.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "llamalab.RNGStateCheckpoint"

    def state_dict(self) -> dict[str, Any]:
        return collect_rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict or None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None

"""Crash safety: a process killed mid-write leaves the previous checkpoint loadable; SIGTERM,
SIGUSR1 and SIGUSR2 save a checkpoint, stop cleanly and the next launch resumes from it; a SLURM
time limit requeues the job after the save (by scontrol, or by submitit's handler with
``ckpt_path=auto`` under ``hydra/launcher=slurm``)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import launch_train
from torch.utils.data import DataLoader, TensorDataset

from llamalab.checkpoint import CheckpointError
from llamalab.checkpoint.commit import commit, remove_path
from llamalab.runner.callbacks import Preempted, PreemptionCheckpoint, RNGStateCheckpoint
from llamalab.runner.checkpoints import (
    WRITE_DELAY_ENV,
    AtomicCheckpointIO,
    AtomicModelCheckpoint,
    atomic_write,
    checkpoint_plugins,
    resolve_ckpt_path,
    resume_candidates,
)

PRETRAIN = [
    "logger=none", "plan.check=false", "~callbacks.progress_bar", "model.dim=64", "model.n_layers=2",
    "model.n_heads=4", "model.max_seq_len=64", "data.batch_size=4", "stage.batch_tokens=256",
    "trainer.limit_val_batches=1", "callbacks.model_checkpoint.every_n_train_steps=2",
]  # fmt: skip


# ---------------------------------------------------------------------------- atomic writes
def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = atomic_write(tmp_path / "a.ckpt", lambda f: torch.save({"v": 1}, f))

    def broken(f) -> None:  # type: ignore[no-untyped-def]
        f.write(b"PK half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert torch.load(target)["v"] == 1
    assert list(tmp_path.iterdir()) == [target]  # the partial file is cleaned up


def test_checkpoint_io_writes_a_loadable_file_and_is_used_for_single_file_strategies(
    tmp_path: Path,
) -> None:
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "sub" / "x.ckpt")
    assert torch.equal(
        io.load_checkpoint(tmp_path / "sub" / "x.ckpt")["state_dict"]["w"], torch.ones(2)
    )
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    assert isinstance(checkpoint_plugins("auto")[0], AtomicCheckpointIO)
    assert isinstance(checkpoint_plugins(DDPStrategy())[0], AtomicCheckpointIO)
    assert checkpoint_plugins(ModelParallelStrategy()) == []  # writes a sharded directory itself


# ---------------------------------------------------------------------------- sharded commits
def _shards(folder: Path, step: int) -> Path:
    """A directory as several ranks write it (DeepSpeed's layout: shards, then ``latest``)."""
    for rank in range(2):
        (folder / "checkpoint").mkdir(parents=True, exist_ok=True)
        (folder / "checkpoint" / f"zero_pp_rank_{rank}_optim_states.pt").write_text(str(step))
    (folder / "latest").write_text("checkpoint")
    return folder


def _step_of(folder: Path) -> set[str]:
    return {p.read_text() for p in (folder / "checkpoint").iterdir()}


def test_a_commit_replaces_a_checkpoint_or_its_link_in_one_step(tmp_path: Path) -> None:
    target = _shards(tmp_path / "step000002.ckpt", 2)
    (tmp_path / "last.ckpt").symlink_to("step000002.ckpt")
    commit(_shards(tmp_path / "last.ckpt.partial-ab12", 3), tmp_path / "last.ckpt")
    assert _step_of(tmp_path / "last.ckpt") == {"3"} and not (tmp_path / "last.ckpt").is_symlink()
    assert _step_of(target) == {"2"}  # the link was replaced, its target left alone
    commit(_shards(tmp_path / "last.ckpt.partial-cd34", 4), tmp_path / "last.ckpt")
    assert _step_of(tmp_path / "last.ckpt") == {"4"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step000002.ckpt"]
    remove_path(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_the_last_link_replaces_a_preemption_save_in_one_rename(tmp_path: Path) -> None:
    """``save_last: link`` after a sharded preemption save: ``last.ckpt`` (a directory) becomes
    a link to the new periodic checkpoint; the directory is set aside before it is deleted."""
    _shards(tmp_path / "last.ckpt", 3)
    _shards(tmp_path / "step000004.ckpt", 4)
    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda: None))
    AtomicModelCheckpoint._link_checkpoint(
        trainer, str(tmp_path / "step000004.ckpt"), str(tmp_path / "last.ckpt")
    )
    assert os.readlink(tmp_path / "last.ckpt") == "step000004.ckpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step000004.ckpt"]


def test_ckpt_path_auto_never_sees_an_uncommitted_or_half_replaced_save(tmp_path: Path) -> None:
    """The states a crash can leave: a save never committed (its ``latest`` marker written by
    rank 0, another rank's shard missing), a commit cut between its two renames, a deletion cut
    short. The lookup and rank 0's cleanup agree on the answer."""
    ckpts = tmp_path / "checkpoints"
    _shards(ckpts / "step000002.ckpt", 2)
    os.utime(ckpts / "step000002.ckpt", (1, 1))
    newest = _shards(ckpts / "step000004.ckpt.partial-9f", 4)  # uncommitted, but looks complete
    (newest / "checkpoint" / "zero_pp_rank_1_optim_states.pt").unlink()
    assert resume_candidates(tmp_path) == [ckpts / "step000002.ckpt"]
    _shards(ckpts / "last.ckpt.old-77", 3)  # commit of last.ckpt cut: the previous one set aside
    _shards(ckpts / "last.ckpt.partial-77", 5)
    _shards(ckpts / "step000001.ckpt.removing-5e", 1)
    assert resume_candidates(tmp_path) == [ckpts / "last.ckpt", ckpts / "step000002.ckpt"]
    assert resolve_ckpt_path("auto", tmp_path) == str(ckpts / "last.ckpt")  # rank 0 cleans up
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step000002.ckpt"]
    assert _step_of(ckpts / "last.ckpt") == {"3"}  # the complete previous version, put back
    with pytest.raises(CheckpointError, match="never finished on every rank"):
        resolve_ckpt_path(str(_shards(ckpts / "x.ckpt.partial-1", 9)), tmp_path)


def _launch(
    args: list[str], cache_dir: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    return launch_train(args, cache_dir, env)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended early (rc={proc.returncode}):\n{proc.stdout.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


@pytest.mark.integration
@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(
    tmp_path: Path, cache_dir: Path
) -> None:
    """Every write pauses halfway (test hook); the run is killed while it writes the step-4
    checkpoint. last.ckpt, a link to step000002.ckpt (never a second copy), must load;
    ckpt_path=auto removes the torn write, resumes from step 2 and finishes."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    args = [*PRETRAIN, "trainer.max_steps=6", f"paths.output_dir={run}"]
    proc = _launch(args, cache_dir, env={WRITE_DELAY_ENV: "3"})

    def torn_write_in_progress() -> bool:
        # The temporary file exists from open() on; the hook pauses only after the first bytes
        # reached the disk, so wait for those (killing earlier would leave an empty file).
        if not (ckpts / "last.ckpt").exists():
            return False
        for partial in ckpts.glob("step000004.ckpt.tmp-*"):
            try:
                if partial.stat().st_size > 0:
                    return True
            except FileNotFoundError:
                pass
        return False

    _wait_for(torn_write_in_progress, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    partial = next(ckpts.glob("step000004.ckpt.tmp-*"))
    assert partial.stat().st_size > 0  # killed mid-write: a torn file under the temporary name
    assert os.readlink(ckpts / "last.ckpt") == "step000002.ckpt"
    previous = torch.load(ckpts / "last.ckpt", weights_only=False, map_location="cpu")
    assert previous["global_step"] == 2 and "optimizer_states" in previous

    resumed = _launch([*args, "ckpt_path=auto"], cache_dir)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    assert "removed 1 partial checkpoint write" in output
    assert f"resuming from {ckpts / 'step000002.ckpt'}" in output
    assert not partial.exists() and (run / "export" / "model.safetensors").exists()
    assert os.readlink(ckpts / "last.ckpt") == "step000006.ckpt"
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 6


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_saves_stops_and_the_next_launch_resumes(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "run"
    args = [*PRETRAIN, "trainer.max_steps=20", f"paths.output_dir={run}"]
    proc = _launch(args, cache_dir)
    _wait_for(lambda: (run / "checkpoints" / "step000002.ckpt").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "SIGTERM: stopped after step" in output and "ckpt_path=last" in output
    assert "Traceback" not in output and not (run / "export").exists()
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert 2 <= saved["global_step"] < 20

    resumed = _launch([*args, "ckpt_path=last"], cache_dir)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 20
    assert (run / "export" / "model.safetensors").exists()


# ---------------------------------------------------------------------------- in-process signals
class _Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SendSignal(L.Callback):
    def __init__(self, signum: int, at_batch: int) -> None:
        self.signum, self.at_batch = signum, at_batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx == self.at_batch:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize(("signum", "accumulate", "saved_step"), [
    (signal.SIGUSR1, 1, 3),  # the signal during batch 2 (step 3): saved after that step
    (signal.SIGTERM, 1, 3),
    (signal.SIGUSR2, 1, 3),  # submitit's time-limit signal
    (signal.SIGUSR1, 2, 2),  # during micro-batch 2 (accumulating): saved at the step boundary
])  # fmt: skip
def test_signal_saves_at_a_step_boundary_and_stops(
    tmp_path: Path, signum: int, accumulate: int, saved_step: int
) -> None:
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    preemption = PreemptionCheckpoint(tmp_path / "checkpoints")
    trainer = L.Trainer(
        max_steps=20, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
        callbacks=[_SendSignal(signum, at_batch=2), preemption, RNGStateCheckpoint()],
    )  # fmt: skip
    handler_before = signal.getsignal(signum)
    with pytest.raises(Preempted) as info:
        _fit(trainer, data)
    assert info.value.code == 128 + signum
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == saved_step == trainer.global_step
    assert "llamalab.RNGStateCheckpoint" in saved["callbacks"]
    assert signal.getsignal(signum) == handler_before  # handlers restored after fit


def _fit(trainer: L.Trainer, data: TensorDataset) -> None:
    """``llamalab.runner.callbacks.fit`` with a plain dataloader (no datamodule)."""
    from llamalab.runner import callbacks

    original = trainer.fit
    trainer.fit = lambda module, datamodule=None, ckpt_path=None: original(  # type: ignore[method-assign]
        module, train_dataloaders=DataLoader(data, batch_size=4), ckpt_path=ckpt_path
    )
    callbacks.fit(trainer, _Regression(), None, None)


# ---------------------------------------------------------------------------- SLURM requeue
def _fake_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ``scontrol`` first on PATH that logs its arguments and whether last.ckpt existed."""
    log, ckpt = tmp_path / "scontrol.log", tmp_path / "checkpoints" / "last.ckpt"
    script = tmp_path / "bin" / "scontrol"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$* $(test -e {ckpt} && echo after-save)" >> {log}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:{os.environ['PATH']}")
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    return log


def _signalled_trainer(tmp_path: Path, signum: int) -> L.Trainer:
    return L.Trainer(
        max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, plugins=[AtomicCheckpointIO()],
        callbacks=[_SendSignal(signum, at_batch=2), PreemptionCheckpoint(tmp_path / "checkpoints")],
    )  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM])
def test_a_slurm_time_limit_requeues_the_job_after_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    log = _fake_scontrol(tmp_path, monkeypatch)
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    with pytest.raises(Preempted) as info:
        _fit(_signalled_trainer(tmp_path, signum), data)
    assert info.value.code == 128 + signum
    if signum == signal.SIGTERM:  # preemption / scancel: SLURM decides about requeueing
        assert not log.exists()
    else:
        assert log.read_text().split() == ["requeue", "4242", "after-save"]


def test_submitit_requeues_the_sweep_point_with_ckpt_path_auto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """submitit's own job-side code, as in a ``hydra/launcher=slurm`` job: its SIGUSR2 handler is
    installed first; the run saves at the step boundary, then hands the signal to it, and submitit
    requeues the job and stores the resubmission, whose overrides now say ``ckpt_path=auto``."""
    import submitit

    from llamalab.runner.slurm_launcher import ResumingSlurmLauncher

    log = _fake_scontrol(tmp_path, monkeypatch)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    (tmp_path / "submitit").mkdir()  # the job folder submitit made when it submitted
    monkeypatch.setenv("SUBMITIT_FOLDER", str(tmp_path / "submitit"))
    monkeypatch.setenv("SLURM_PROCID", "0")
    point = (["stage=sft", "ckpt_path=null"], "hydra.sweep.dir", 0, "job_id_for_0", {})
    delayed = submitit.helpers.DelayedSubmission(ResumingSlurmLauncher(), *point)
    delayed._timeout_min, delayed._timeout_countdown = 60, 3  # what submitting sets
    env = submitit.JobEnvironment()
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGCONT, signal.SIGUSR2)}
    env._handle_signals(env.paths, delayed)
    try:
        data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
        with pytest.raises(Preempted) as info:
            _fit(_signalled_trainer(tmp_path, signal.SIGUSR2), data)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert info.value.code == 128 + signal.SIGUSR2
    assert log.read_text().split() == ["requeue", "4242", "after-save"]  # once, by submitit
    requeued = submitit.helpers.DelayedSubmission.load(env.paths.submitted_pickle)
    assert isinstance(requeued.function, ResumingSlurmLauncher)
    assert requeued.args[0] == ["stage=sft", "ckpt_path=auto"]
    assert requeued.args[1:] == point[1:]

"""Two CPU processes (gloo) running each stage's DEFAULT config (issue 20).

What a cluster user's first launch does: the default logger (W&B, offline here), the default
callbacks (progress bar, periodic checkpoints, W&B tracking with sample tables), the default
validation schedule and the export. Only the length (``trainer.max_steps``), the strategy, the
device count and where outputs go (``paths.outputs_root``) are set, so that ``outputs/<stage>/
latest`` is checked too.

- pretraining under ``ddp`` (started by torchrun), ``fsdp`` and ``deepspeed_zero3`` (the
  straight run of the ZeRO-3 resume test);
- the ddp pretraining run then feeds SFT (``fsdp``), the two reward models (``ddp``; the safety
  one on a single process, it is only an input) and PPO (``deepspeed_zero3``), each finding its
  inputs through ``latest`` as the default stage configs do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import run_train, torchrun_train

from llamalab.checkpoint import load_model
from llamalab.runner.callbacks import PREEMPT_AT_STEP_ENV
from llamalab.runner.tracking import read_offline_run
from llamalab.scale.deepspeed_cpu import DIE_IN_SAVE_ENV

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.distributed]


def two_processes(strategy: str) -> list[str]:
    return [f"strategy={strategy}", "trainer.devices=2"]


def launch(root: Path, cache_dir: Path, *args: str) -> Path:
    """``python src/train.py ARGS paths.outputs_root=ROOT``; returns the stage's ``latest``."""
    result = run_train([*args, f"paths.outputs_root={root}"], cache_dir, timeout=900)
    output = result.stdout[-3000:] + result.stderr[-5000:]
    assert result.returncode == 0, output
    assert "Traceback" not in result.stderr, output  # no rank crashed, even one that was waited on
    return root


def check_run(run: Path) -> None:
    """What every finished run leaves: an export that loads, one W&B offline run holding the
    config and the training curve, the CSV log, a checkpoint."""
    assert run.is_dir(), run
    model = load_model(run / "export")
    assert sum(p.numel() for p in model.parameters()) > 0
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, offline  # rank 0's run only
    recorded = read_offline_run(run)
    assert recorded.config.get("stage", {}).get("name"), "the resolved config is in the W&B run"
    assert any(k.startswith("train/") for row in recorded.history for k in row), "no train/ rows"
    assert (run / "csv" / "metrics.csv").is_file()
    assert list((run / "checkpoints").iterdir()), "no checkpoint"


def latest(root: Path, run_name: str) -> Path:
    link = root / run_name / "latest"
    assert link.is_symlink(), f"{link} was not linked"
    return link.resolve()


@pytest.fixture(scope="module")
def ddp_root(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The default job under ddp on 2 processes started by torchrun (README, "Multi-node"):
    `torchrun --nproc-per-node=2 src/train.py strategy=ddp trainer.devices=2 ...`, with no
    output directory given: both ranks must land in the one run directory named after
    torchrun's rendezvous id (llamalab.runner.paths), not each in its own timestamp."""
    root = tmp_path_factory.mktemp("ddp_outputs")
    args = [*two_processes("ddp"), "trainer.max_steps=3", f"paths.outputs_root={root}"]
    result = torchrun_train(args, cache_dir)
    output = result.stdout[-3000:] + result.stderr[-5000:]
    assert result.returncode == 0, output
    (run,) = [p for p in (root / "pretrain").iterdir() if p.name != "latest"]  # one, not two
    assert run.name.startswith("torchrun-") and latest(root, "pretrain") == run.resolve()
    return root


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])  # deepspeed_zero3: the resume test below
def test_default_pretraining_on_two_processes(
    strategy: str, ddp_root: Path, tmp_path: Path, cache_dir: Path
) -> None:
    if strategy == "ddp":
        root = ddp_root
    else:
        root = launch(tmp_path, cache_dir, *two_processes(strategy), "trainer.max_steps=3")
    check_run(latest(root, "pretrain"))


def test_default_downstream_stages_on_two_processes(ddp_root: Path, cache_dir: Path) -> None:
    """SFT, both reward models and PPO from the ddp pretraining run, each on its own strategy,
    each finding its inputs through `latest` (the stage configs' defaults)."""
    launch(ddp_root, cache_dir, "stage=sft", *two_processes("fsdp"), "trainer.max_steps=3")
    check_run(latest(ddp_root, "sft"))
    launch(ddp_root, cache_dir, "stage=reward", "rm=helpful", *two_processes("ddp"),
           "trainer.max_steps=3")  # fmt: skip
    check_run(latest(ddp_root, "reward_helpful"))
    launch(ddp_root, cache_dir, "stage=reward", "rm=safety", "trainer.max_steps=2")
    # PPO at tiny: 8 optimizer steps per iteration, so one iteration.
    launch(
        ddp_root, cache_dir, "stage=ppo", *two_processes("deepspeed_zero3"), "trainer.max_steps=8"
    )
    check_run(latest(ddp_root, "ppo"))


def test_default_pretraining_resumes_exactly_under_zero3(tmp_path: Path, cache_dir: Path) -> None:
    """Issue 21 under ``strategy=deepspeed_zero3`` on 2 processes: stopped after step 3 (before
    the first periodic checkpoint, the case that used to resume into the next epoch's order),
    resumed with ``ckpt_path=last``; then stopped again at step 5, and rank 1 dies as it starts
    writing its partition of that save (rank 0 writes all of its part, DeepSpeed's ``latest``
    marker included). The half-written save was never committed: ``ckpt_path=auto`` removes it
    and resumes from step 3's ``last.ckpt``, and the export equals the straight run's bit for bit.
    """
    args = [*two_processes("deepspeed_zero3"), "trainer.max_steps=6"]
    a, b = tmp_path / "straight", tmp_path / "resumed"
    result = run_train([*args, f"paths.output_dir={a}"], cache_dir)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "Traceback" not in result.stderr, result.stderr[-5000:]
    check_run(a)  # the default ZeRO-3 job's outputs, as the other strategies' above
    result = run_train([*args, f"paths.output_dir={b}"], cache_dir, env={PREEMPT_AT_STEP_ENV: "3"})
    assert result.returncode == 143, result.stderr[-5000:]
    last = b / "checkpoints" / "last.ckpt"
    assert saved_step(last) == 3
    crash = {PREEMPT_AT_STEP_ENV: "5", DIE_IN_SAVE_ENV: "1:5"}
    result = run_train([*args, f"paths.output_dir={b}", "ckpt_path=last"], cache_dir, env=crash)
    assert result.returncode not in (0, 143), result.stderr[-5000:]
    (partial,) = (b / "checkpoints").glob("last.ckpt.partial-*")
    assert (partial / "latest").is_file() and saved_step(partial) == 5  # rank 0's part: all there
    assert not list(partial.glob("checkpoint/zero_pp_rank_1_*"))  # rank 1's: never written
    assert saved_step(last) == 3  # untouched
    result = run_train([*args, f"paths.output_dir={b}", "ckpt_path=auto"], cache_dir)
    assert result.returncode == 0, result.stderr[-5000:]
    assert f"resuming from {last}" in result.stdout + result.stderr
    assert not list((b / "checkpoints").glob("*.partial-*"))
    wa, wb = load_model(a / "export").state_dict(), load_model(b / "export").state_dict()
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed ZeRO-3 run differs"


def saved_step(ckpt: Path) -> int:
    """The step of a DeepSpeed checkpoint directory (Lightning's state in rank 0's file)."""
    state = torch.load(ckpt / "checkpoint" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                       weights_only=False)  # fmt: skip
    return int(state["global_step"])

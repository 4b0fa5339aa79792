"""Exact resume on each stage's DEFAULT config (issue 21): what a user runs, not a quiet config.

Only ``trainer.max_steps``, ``paths.output_dir`` (and, for SFT, the input it starts from, plus
``data.batch_size`` where gradient accumulation is the point) are overridden: the default model
size, logger (W&B offline), callbacks (progress bar, periodic checkpoints), validation schedule
and export are the ones ``python src/train.py`` uses.

Each test runs the job straight, then the same job interrupted several times and resumed with
``ckpt_path=last`` after each stop, and asserts bit-identical exported weights. The stops cover:
before the first periodic checkpoint (a real SIGTERM sent by this test), right after one, just
after a validation, in the middle of gradient accumulation, and at an epoch boundary (SFT).

The default pretraining job validates and checkpoints every 50 steps, so 52 steps are the
fewest that cross both; default SFT validates once per epoch (38 steps at ``tiny``). The runs
with gradient accumulation are shorter (8-10 steps): they test stops inside an optimizer step,
the longer runs the checkpoint, validation and epoch crossings.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import launch_train, run_train
from safetensors.torch import load_file

from llamalab.runner.callbacks import PREEMPT_AT_STEP_ENV, SIGNAL_AT_BATCH_ENV, SIGNAL_ENV

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PRETRAIN_STEPS = 52  # default job: validation and periodic checkpoint at step 50
SFT_STEPS = 40  # default SFT at tiny: 38 steps per epoch, validation at each epoch's end


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "export" / "model.safetensors")


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diff, (
        f"{len(diff)} tensors differ, largest {max(diff.values()):.3g}: {list(diff)[:3]}"
    )


def sigterm_once_training(overrides: list[str], cache_dir: Path, delay: float = 2.0) -> str:
    """Start ``train.py``, send it a real SIGTERM shortly after the model summary is printed
    (the signal handlers are installed by then), and wait for it to stop."""
    proc = launch_train(overrides, cache_dir)
    assert proc.stdout is not None
    seen: list[str] = []
    for line in proc.stdout:
        seen.append(line)
        if "Trainable params" in line:
            time.sleep(delay)
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=900)
    output = "".join(seen) + (rest or "")
    assert proc.returncode == 143, output[-3000:]  # 128 + SIGTERM, after saving last.ckpt
    assert "SIGTERM: stopped after step" in output, output[-3000:]
    return output


def saved_step(run_dir: Path) -> int:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return int(ckpt["global_step"])


def interrupted(
    overrides: list[str],
    cache_dir: Path,
    stops: list[dict[str, str]],
    out: Path,
    resume: str = "last",
) -> Path:
    """Run ``overrides`` stopped by each env hook of ``stops`` in turn (each launch after the
    first resumes with ``ckpt_path=last``), then once more to the end. ``resume="auto"``: every
    launch, the first included, carries ``ckpt_path=auto``: the one command a SLURM job requeues.
    """
    args = [*overrides, f"paths.output_dir={out}"]
    for i, hook in enumerate(stops):
        again = [f"ckpt_path={resume}"] if i or resume == "auto" else []
        result = run_train([*args, *again], cache_dir, env=hook)
        sent = signal.Signals[f"SIG{hook.get(SIGNAL_ENV, 'TERM')}"]
        assert result.returncode == 128 + sent, (hook, result.stderr[-3000:])  # 143, 140 ...
        assert f"{sent.name}: stopped after step" in result.stdout + result.stderr
        assert not (out / "export").exists()  # a preempted run exports nothing
    result = run_train([*args, f"ckpt_path={resume}"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def straight(overrides: list[str], cache_dir: Path, out: Path) -> Path:
    result = run_train([*overrides, f"paths.output_dir={out}"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# ---------------------------------------------------------------------------- pretraining
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The default job run straight for 52 steps (also SFT's starting point below)."""
    out = tmp_path_factory.mktemp("pretrain") / "straight"
    return straight([f"trainer.max_steps={PRETRAIN_STEPS}"], cache_dir, out)


def test_default_pretraining_resumes_exactly(
    pretrained: Path, tmp_path: Path, cache_dir: Path
) -> None:
    """A real SIGTERM early in the run (before the first periodic checkpoint), then stops right
    after the step-50 checkpoint and validation and one step later, each resumed."""
    steps = [f"trainer.max_steps={PRETRAIN_STEPS}"]
    out = tmp_path / "resumed"
    sigterm_once_training([*steps, f"paths.output_dir={out}"], cache_dir)
    first = saved_step(out)
    assert 1 <= first < 50, first  # before the first periodic checkpoint
    stops = [{PREEMPT_AT_STEP_ENV: "50"}, {PREEMPT_AT_STEP_ENV: "51"}]
    for hook in stops:
        result = run_train(
            [*steps, f"paths.output_dir={out}", "ckpt_path=last"], cache_dir, env=hook
        )
        assert result.returncode == 143, result.stderr[-3000:]
        assert saved_step(out) == int(hook[PREEMPT_AT_STEP_ENV])
    result = run_train([*steps, f"paths.output_dir={out}", "ckpt_path=last"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_identical(weights(pretrained), weights(out))


def test_default_pretraining_with_accumulation_resumes_exactly(
    tmp_path: Path, cache_dir: Path
) -> None:
    """``data.batch_size=8``: 2 micro-batches per step. A real SIGTERM as micro-batch 6 starts
    (the first half of step 4) is honoured after step 4, and a real SIGUSR2 (SLURM's time-limit
    warning under submitit) as micro-batch 13 starts (the second half of step 7) after step 7.
    Every launch is the same command with ``ckpt_path=auto``, as a requeued SLURM job runs it.
    10 steps: the checkpoint and validation crossings are the test above's (each step here costs
    as much, and the suite's time is bounded)."""
    overrides = ["trainer.max_steps=10", "data.batch_size=8"]
    reference = straight(overrides, cache_dir, tmp_path / "straight")
    stops = [{SIGNAL_AT_BATCH_ENV: "6"}, {SIGNAL_AT_BATCH_ENV: "13", SIGNAL_ENV: "USR2"}]
    resumed = interrupted(overrides, cache_dir, stops, tmp_path / "resumed", resume="auto")
    assert_identical(weights(reference), weights(resumed))


# ---------------------------------------------------------------------------- SFT
def sft_overrides(init: Path, *extra: str) -> list[str]:
    return ["stage=sft", f"stage.init={init}", *extra]


@pytest.mark.parametrize(
    ("extra", "stops"),
    [
        # before any checkpoint, at the epoch's last step (validation follows), just after it
        (
            (f"trainer.max_steps={SFT_STEPS}",),
            [{PREEMPT_AT_STEP_ENV: "3"}, {PREEMPT_AT_STEP_ENV: "38"}, {PREEMPT_AT_STEP_ENV: "39"}],
        ),
        # 2 micro-batches per step: real signals mid-accumulation (micro-batches 4 and 9 start
        # the first and second halves of steps 3 and 5), 8 steps
        (
            ("trainer.max_steps=8", "data.batch_size=8"),
            [{SIGNAL_AT_BATCH_ENV: "4"}, {SIGNAL_AT_BATCH_ENV: "9"}],
        ),
    ],
    ids=["no_accumulation", "accumulation"],
)
def test_default_sft_resumes_exactly(
    extra: tuple[str, ...],
    stops: list[dict[str, str]],
    pretrained: Path,
    tmp_path: Path,
    cache_dir: Path,
) -> None:
    overrides = sft_overrides(pretrained, *extra)
    reference = straight(overrides, cache_dir, tmp_path / "straight")
    resumed = interrupted(overrides, cache_dir, stops, tmp_path / "resumed")
    assert_identical(weights(reference), weights(resumed))

"""Numerical guards: a NaN/inf loss or gradient norm stops the run naming the step, the stage and
the last good checkpoint (``stage.nonfinite=stop``), or skips the update and counts it (``skip``)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
import torch
from helpers import run_train

from llamalab.model import LlamaConfig
from llamalab.stages.base import NonFiniteError
from llamalab.stages.pretrain import PretrainStage

ARCH = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16).to_dict()
OPTIM = {"lr": 1e-3, "weight_decay": 0.1}
# lr 1e30: the first update throws every weight to ~1e30, the next gradient norm is NaN.
EXPLODING = [
    "logger=none", "plan.check=false", "~callbacks.progress_bar", "model.dim=64", "model.n_layers=2",
    "model.n_heads=4", "model.max_seq_len=64", "data.batch_size=4", "stage.batch_tokens=256",
    "trainer.max_steps=4", "trainer.limit_val_batches=1", "stage.optim.lr=1e30",
    "stage.optim.warmup_steps=0", "callbacks.model_checkpoint.every_n_train_steps=1",
]  # fmt: skip


def stage(nonfinite: str) -> PretrainStage:
    module = PretrainStage(arch=ARCH, optim=OPTIM, nonfinite=nonfinite, name="pretrain")
    module.configure_model()
    return module


def test_stop_names_step_stage_and_that_no_checkpoint_exists_yet() -> None:
    with pytest.raises(NonFiniteError) as info:
        stage("stop").check_finite(torch.tensor(float("inf")), "loss")
    message = str(info.value)
    assert "non-finite loss (inf) at step 0 of stage 'pretrain'" in message
    assert "Last good checkpoint: none saved yet" in message


def test_skip_drops_every_gradient_so_adamw_leaves_the_weights_alone() -> None:
    module = stage("skip")
    assert module.check_finite(torch.tensor(1.0), "loss") and module.skipped_batches == 0
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    next(module.parameters()).grad[0] = float("nan")
    before = [p.detach().clone() for p in module.parameters()]
    optimizer = torch.optim.AdamW(module.parameters(), lr=1.0, weight_decay=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a trainer
        module.on_before_optimizer_step(optimizer)
    optimizer.step()
    assert module.skipped_batches == 1
    assert all(p.grad is None for p in module.parameters())
    # A zeroed gradient would still move the weights (weight decay, momentum); None does not.
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match=r"stage\.nonfinite must be 'stop' or 'skip'"):
        PretrainStage(arch=ARCH, optim=OPTIM, nonfinite="ignore")


@pytest.mark.integration
def test_nan_stops_the_run_naming_step_stage_and_last_good_checkpoint(
    tmp_path: Path, cache_dir: Path
) -> None:
    result = run_train([*EXPLODING, f"paths.output_dir={tmp_path}"], cache_dir)
    assert result.returncode == 1
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert result.stderr.strip().splitlines()[-1] == (
        "error: non-finite gradient norm (nan) at step 1 of stage 'pretrain'. Last good "
        f"checkpoint: {last} (resume with ckpt_path={last})"
    )
    assert "Traceback" not in result.stderr
    assert torch.load(last, weights_only=False)["global_step"] == 1  # preserved and loadable


@pytest.mark.integration
def test_skip_mode_counts_skipped_batches_and_finishes(tmp_path: Path, cache_dir: Path) -> None:
    result = run_train(
        [*EXPLODING, "stage.nonfinite=skip", f"paths.output_dir={tmp_path}"], cache_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/skipped_batches")]
    assert [float(r["train/skipped_batches"]) for r in rows] == [1.0, 2.0, 3.0]
    # Skipped steps change nothing: the loss of every later step is the same number.
    assert len({r["train/loss"] for r in rows}) == 1
    assert (tmp_path / "export" / "model.safetensors").exists()

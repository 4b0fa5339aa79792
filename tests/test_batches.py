"""The batch rule (README, Scale): config batch sizes are global, the micro-batch is per GPU, and
sizes that do not divide stop the run before anything is built (llamalab.scale.batches)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import compose_config, run_train

from llamalab.model.config import ConfigError
from llamalab.runner.run import accumulation, data_overrides
from llamalab.scale.batches import batch_layout, ppo_layout
from llamalab.scale.strategies import world_size

STAGES = ["pretrain", "sft", "reward", "dpo", "rejection_sampling", "ppo"]


@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.parametrize("stage", STAGES)
def test_tiny_defaults_divide_on_one_and_two_processes(stage: str, devices: int) -> None:
    """What the tests and the CPU demos run: every stage's tiny defaults keep their global
    batch on 1 and on 2 processes (more micro-batches per step on 1, fewer on 2)."""
    cfg = compose_config([f"stage={stage}", f"trainer.devices={devices}"])
    layout = batch_layout(cfg, devices)
    assert layout is not None
    assert layout.per_rank * devices == layout.global_batch
    if stage == "ppo":
        assert layout.mini_per_rank == layout.micro_batch * layout.accumulation
        assert layout.mini_batches * layout.mini_batch == layout.global_batch
    else:
        assert layout.per_rank == layout.micro_batch * layout.accumulation
        assert accumulation(cfg, devices) == layout.accumulation


@pytest.mark.parametrize(
    ("model", "stage", "per_rank", "micro"),
    [
        ("70b", "ppo", 8, 1),  # 512 prompts on 64 GPUs; mini-batch 64 = one row per GPU
        ("70b", "sft", 1, 1),  # 64 sequences on 64 GPUs
        ("70b", "reward", 8, 1),  # 512 pairs on 64 GPUs, one pair (2 rows) at a time
        ("70b", "dpo", 1, 1),
        ("70b", "rejection_sampling", 1, 1),
        ("70b", "pretrain", 16, 4),  # 4M tokens = 1024 x 4096 on 64 GPUs
        ("13b", "sft", 4, 4),
        ("13b", "reward", 32, 8),
        ("7b", "sft", 8, 8),
    ],
)
def test_paper_sizes_keep_the_paper_batch(model: str, stage: str, per_rank: int, micro: int):
    cfg = compose_config([f"model={model}", f"stage={stage}"])
    layout = batch_layout(cfg, world_size(cfg))
    assert layout is not None
    assert (layout.per_rank, layout.micro_batch) == (per_rank, micro)
    paper = {"ppo": 512, "sft": 64, "reward": 512, "dpo": 64, "rejection_sampling": 64}
    assert layout.global_batch == paper.get(stage, 1024)
    if stage == "ppo":
        assert (layout.mini_batch, layout.mini_per_rank, layout.mini_batches) == (64, 1, 8)
        assert data_overrides(cfg, world_size(cfg)) == {"batch_size": 8}  # each rank's loader


@pytest.mark.parametrize(
    ("args", "world", "named"),
    [
        ((100, 64, None), 1, "stage.rollout_batch (100) does not divide by stage.mini_batch (64)"),
        ((512, 64, None), 3, "stage.rollout_batch (512) does not divide by the world size (3)"),
        ((512, 64, 3), 8, "stage.mini_batch per rank (64 / 8) (8) does not divide by stage.micro"),
        ((512, 0, None), 1, "stage.mini_batch=0"),
    ],
)
def test_ppo_sizes_that_do_not_divide_are_named(args: tuple, world: int, named: str) -> None:
    with pytest.raises(ConfigError) as error:
        ppo_layout(*args, world)
    assert named in str(error.value)


def test_item_stage_sizes_that_do_not_divide_are_named() -> None:
    cfg = compose_config(["stage=sft", "stage.batch_size=64", "data.batch_size=3"])
    with pytest.raises(ConfigError) as error:
        accumulation(cfg, 2)
    assert "stage.batch_size per rank (64 / 2) (32) does not divide by data.batch_size" in str(
        error.value
    )
    cfg = compose_config(["stage=reward", "stage.batch_size=30"])
    with pytest.raises(ConfigError, match=r"stage.batch_size \(30\) does not divide by the world"):
        accumulation(cfg, 4)


@pytest.mark.integration
def test_a_launch_with_sizes_that_do_not_divide_stops_at_once(cache_dir: Path) -> None:
    """Through src/train.py, before the plan or any model: one line naming the keys, exit 1."""
    result = run_train(
        ["stage=ppo", "stage.rollout_batch=96", "stage.mini_batch=64", "dry_run=true"], cache_dir
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "stage.rollout_batch (96) does not divide by stage.mini_batch (64)" in result.stderr

"""One run directory for every rank of a launch (llamalab.runner.paths): the name all ranks
derive alike from the launcher's environment, the stop when nothing names the launch, and which
process counts as rank 0 before the process group exists."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import compose_config

from llamalab.model.config import ConfigError
from llamalab.runner.paths import check_launch, launch_name, run_dir_name
from llamalab.scale.build import is_rank_zero

STARTED = "2026-12-01_10-00-00"


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({}, STARTED),  # one process (or Lightning's launcher): rank 0's start time
        ({"SLURM_JOB_ID": "8812", "SLURM_JOB_NAME": "train"}, "slurm-8812"),
        ({"SLURM_JOB_ID": "8813", "SLURM_ARRAY_JOB_ID": "8800", "SLURM_ARRAY_TASK_ID": "3"},
         "slurm-8800_3"),
        ({"SLURM_JOB_ID": "8814", "SLURM_JOB_NAME": "interactive"}, STARTED),  # salloc shell
        ({"TORCHELASTIC_RUN_ID": "ppo70b", "WORLD_SIZE": "64"}, "torchrun-ppo70b"),
        ({"TORCHELASTIC_RUN_ID": "none"}, STARTED),  # torchrun's default is not an id
        ({"LLAMALAB_RUN_ID": "exp/7", "SLURM_JOB_ID": "1", "TORCHELASTIC_RUN_ID": "x"}, "exp_7"),
    ],
    ids=["none", "slurm", "slurm_array", "salloc", "torchrun", "torchrun_default", "explicit"],
)  # fmt: skip
def test_every_rank_derives_the_same_run_directory(env: dict[str, str], name: str) -> None:
    for rank in range(3):  # what differs between ranks does not enter the name
        ranked = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "SLURM_PROCID": str(rank)}
        assert run_dir_name(ranked, started=STARTED) == name
    assert (launch_name(env) is None) == (name == STARTED)


def test_a_rank_started_without_a_shared_name_stops_before_hydra() -> None:
    independent = {"WORLD_SIZE": "2", "RANK": "1", "TORCHELASTIC_RUN_ID": "none"}
    with pytest.raises(ConfigError, match=r"torchrun --rdzv-id"):
        check_launch(["stage=sft"], independent)
    check_launch(["stage=sft", "paths.output_dir=/runs/a"], independent)  # named by the user
    check_launch(["hydra.run.dir=/runs/a"], independent)  # Lightning's launcher's children
    check_launch(["stage=sft"], {**independent, "LLAMALAB_RUN_ID": "a"})
    check_launch(["stage=sft"], {})  # rank 0 of Lightning's launcher: it decides


def test_the_run_directory_follows_the_slurm_job(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The composed config's ``hydra.run.dir``: a requeued job (same id) finds its run again."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_JOB_NAME", raising=False)
    monkeypatch.delenv("LLAMALAB_RUN_ID", raising=False)
    cfg = compose_config(["stage=sft", f"paths.outputs_root={tmp_path}"])
    assert cfg.hydra.run.dir == f"{tmp_path}/sft/slurm-4242"
    cfg = compose_config([f"paths.output_dir={tmp_path / 'mine'}"])
    assert cfg.hydra.run.dir == str(tmp_path / "mine")


@pytest.mark.parametrize(
    ("env", "zero"),
    [
        ({}, True),
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),  # torchrun's first rank
        ({"RANK": "8", "LOCAL_RANK": "0"}, False),  # torchrun, second node
        ({"SLURM_PROCID": "5"}, False),  # srun task 5 (no RANK before the process group)
        ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, False),  # Lightning's child in a SLURM batch
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),  # Lightning's launcher, second node
    ],
)
def test_rank_zero_before_the_process_group(
    env: dict[str, str], zero: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only rank 0 cleans a run's checkpoints up before resuming (llamalab.runner.checkpoints)."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert is_rank_zero() is zero

"""Exact resume: N steps straight and N/2, preemption, resume to N give bit-identical weights
for every stage; how ``ckpt_path`` is resolved and which checkpoints are refused."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_train
from safetensors.torch import load_file

from llamalab.checkpoint import CheckpointError
from llamalab.model import LlamaConfig
from llamalab.runner.callbacks import PREEMPT_AT_STEP_ENV, collect_rng_states, set_rng_states
from llamalab.runner.checkpoints import (
    MissingCheckpointError,
    atomic_write,
    check_resume_checkpoint,
    resolve_ckpt_path,
)

QUIET = [
    "logger=none",
    "plan.check=false",
    "trainer.deterministic=true",
    "+trainer.enable_progress_bar=false",
]
# Pretraining at a size that steps in well under a second on 2 cores; 2 micro-batches per step
# (batch_tokens 512 = 2 x 4 x 64), so resuming must also respect gradient accumulation.
PRETRAIN = [
    *QUIET, "~callbacks.progress_bar", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
    "model.max_seq_len=64", "data.batch_size=4", "stage.batch_tokens=512", "trainer.max_steps=4",
    "trainer.limit_val_batches=1", "callbacks.model_checkpoint.every_n_train_steps=2",
]  # fmt: skip


# ---------------------------------------------------------------------------- straight vs resumed
def exported_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "export" / "model.safetensors")


def straight_and_resumed(
    tmp_path: Path, cache_dir: Path, overrides: list[str], stop_at: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run ``overrides`` straight; then again, preempted after optimizer step ``stop_at``
    (the test hook acts as SIGTERM there) and resumed with ``ckpt_path=last``."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_train([*overrides, f"paths.output_dir={straight}"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]

    result = run_train(
        [*overrides, f"paths.output_dir={resumed}"],
        cache_dir,
        env={PREEMPT_AT_STEP_ENV: str(stop_at)},
    )
    assert result.returncode == 143, result.stderr[-3000:]  # 128 + SIGTERM
    assert f"stopped after step {stop_at}" in result.stdout + result.stderr
    assert not (resumed / "export").exists()  # a preempted run exports nothing
    saved = torch.load(
        resumed / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu"
    )
    assert saved["global_step"] == stop_at

    result = run_train([*overrides, f"paths.output_dir={resumed}", "ckpt_path=last"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return exported_weights(straight), exported_weights(resumed)


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def tiny_inputs(tiny_checkpoints: dict) -> dict[str, Path]:
    """A random tiny policy (the SFT / reward / PPO init) and a reward model (critic and both
    RMs), with the 512-piece tokenizer: conftest's ``tiny_checkpoints``."""
    return {"policy": tiny_checkpoints["sft"], "rm": tiny_checkpoints["rm"]}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.experiment  # make test-experiments: test_resume_defaults.py proves this on the default config
def test_pretraining_resumes_bit_identically(tmp_path: Path, cache_dir: Path) -> None:
    a, b = straight_and_resumed(tmp_path, cache_dir, PRETRAIN, stop_at=2)
    assert_identical(a, b)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.experiment  # make test-experiments: test_resume_defaults.py proves this on the default config
def test_sft_resumes_bit_identically(tmp_path: Path, cache_dir: Path, tiny_inputs) -> None:
    overrides = [
        *QUIET, "stage=sft", "callbacks=none", f"stage.init={tiny_inputs['policy']}",
        "data.builtin_size=48", "data.batch_size=4", "stage.batch_size=8",
        "stage.sample_generations=0", "trainer.max_steps=4", "++trainer.limit_val_batches=1",
    ]  # fmt: skip
    a, b = straight_and_resumed(tmp_path, cache_dir, overrides, stop_at=2)
    assert_identical(a, b)


@pytest.mark.integration
@pytest.mark.slow
def test_reward_model_resumes_bit_identically(tmp_path: Path, cache_dir: Path, tiny_inputs) -> None:
    overrides = [
        *QUIET, "stage=reward", "callbacks=none", f"stage.init={tiny_inputs['policy']}",
        "data.builtin_size=64", "data.batch_size=4", "stage.batch_size=8",
        "trainer.max_steps=4", "++trainer.limit_val_batches=1",
    ]  # fmt: skip
    a, b = straight_and_resumed(tmp_path, cache_dir, overrides, stop_at=2)
    assert_identical(a, b)


@pytest.mark.integration
@pytest.mark.slow
def test_dpo_resumes_bit_identically(tmp_path: Path, cache_dir: Path, tiny_inputs) -> None:
    """The policy resumes from the checkpoint; the frozen reference, left out of it, is reloaded
    from stage.init."""
    overrides = [
        *QUIET, "stage=dpo", "callbacks=none", f"stage.init={tiny_inputs['policy']}",
        "data.builtin_size=16", "data.batch_size=4", "stage.batch_size=8",
        "trainer.max_steps=4", "++trainer.limit_val_batches=1",
    ]  # fmt: skip
    a, b = straight_and_resumed(tmp_path, cache_dir, overrides, stop_at=2)
    assert_identical(a, b)


@pytest.mark.integration
@pytest.mark.slow
def test_ppo_resumes_bit_identically(tmp_path: Path, cache_dir: Path, tiny_inputs) -> None:
    """Actor weights after 3 iterations equal those of 1 iteration + preemption + 2 more: the
    rollout seeds, prompt position, KL controller and running reward moments all resume."""
    rm = tiny_inputs["rm"]
    overrides = [
        *QUIET, "stage=ppo", "callbacks=none", f"stage.init={tiny_inputs['policy']}",
        "stage.reference=${stage.init}", f"stage.critic_init={rm}", f"stage.reward_helpful={rm}",
        f"stage.reward_safety={rm}",
        "stage.iterations=3", "stage.rollout_batch=8", "stage.mini_batch=4", "stage.ppo_epochs=1",
        "stage.max_new_tokens=8", "stage.generation_batch=8", "stage.eval_every=null",
        "stage.adaptive_kl=true", "++data.builtin_size=24",
    ]  # fmt: skip
    a, b = straight_and_resumed(tmp_path, cache_dir, overrides, stop_at=2)  # 2 steps/iteration
    assert_identical(a, b)


# ---------------------------------------------------------------------------- RNG states
def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    states = collect_rng_states()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    path = atomic_write(tmp_path / "rng.pt", lambda f: torch.save(states, f))
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_states(torch.load(path, weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


# ---------------------------------------------------------------------------- ckpt_path
def fake_checkpoint(path: Path, stage: str = "pretrain", arch: LlamaConfig | None = None) -> Path:
    arch = arch or LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16)
    meta = {"model_config": arch.to_dict(), "head": "lm", "prefix": "model.", "stage": stage}
    return atomic_write(path, lambda f: torch.save({"llamalab": meta, "state_dict": {}}, f))


def test_ckpt_path_keywords_find_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    assert resolve_ckpt_path(None, tmp_path) is None
    assert resolve_ckpt_path("auto", tmp_path) is None  # nothing yet: a fresh start
    with pytest.raises(MissingCheckpointError, match="ckpt_path=last: no checkpoint in"):
        resolve_ckpt_path("last", tmp_path)
    ckpts = tmp_path / "checkpoints"
    older = fake_checkpoint(ckpts / "step000002.ckpt")
    newer = fake_checkpoint(ckpts / "last.ckpt")
    import os

    os.utime(older, (1, 1))
    assert resolve_ckpt_path("last", tmp_path) == str(newer)
    torn = ckpts / "step000004.ckpt"  # a non-atomic writer killed mid-write: newest, but torn
    torn.write_bytes(newer.read_bytes()[:100])
    assert resolve_ckpt_path("auto", tmp_path) == str(newer)
    dead_partial = ckpts / "last.ckpt.tmp-999999999"  # no such pid: a killed writer's leftover
    dead_partial.write_bytes(b"PK")
    resolve_ckpt_path("auto", tmp_path)
    assert not dead_partial.exists()


def test_explicit_ckpt_path_must_exist_and_be_complete(tmp_path: Path) -> None:
    with pytest.raises(MissingCheckpointError, match="does not exist"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), tmp_path)
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(b"PK\x03\x04 half a checkpoint")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_ckpt_path(str(torn), tmp_path)


def test_resume_refuses_another_stage_or_architecture(tmp_path: Path) -> None:
    arch = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16)
    ours = fake_checkpoint(tmp_path / "a.ckpt", "sft", arch)
    check_resume_checkpoint(ours, arch, "sft")  # its own run: accepted
    with pytest.raises(CheckpointError, match="written by stage 'sft', this is stage 'reward'"):
        check_resume_checkpoint(ours, arch, "reward")
    bigger = LlamaConfig(dim=64, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16)
    with pytest.raises(CheckpointError, match=r"another architecture: dim=32 \(this run: 64\)"):
        check_resume_checkpoint(ours, bigger, "sft")
    foreign = atomic_write(tmp_path / "b.ckpt", lambda f: torch.save({"state_dict": {}}, f))
    with pytest.raises(CheckpointError, match="not a llamalab training checkpoint"):
        check_resume_checkpoint(foreign, arch, "sft")

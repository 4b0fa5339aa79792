"""The plan uses the rows that really run (README, Scale): a small PPO run counts the rows and
tokens every model's forward sees per rank in each phase (generation, scoring and readings by
the frozen models, PPO forward/backward) and compares them with ``dry_run``'s ``batch`` section
for the same config."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import compose_config
from helpers.rlhf import checkpoint_paths, make_ppo_stage

from llamalab.data.prompts import PromptDataModule
from llamalab.runner.run import architecture, data_overrides
from llamalab.scale.plan_cfg import plan_from_config
from llamalab.stages.ppo import PPOStage

SIZES = {"rollout_batch": 8, "mini_batch": 4, "micro_batch": 2, "generation_batch": 4}
NEW_TOKENS, PROMPT_LEN = 6, 40


class PhaseCounter:
    """Forward hooks on the stage's five models: (rows, columns) of every call, by phase."""

    def __init__(self) -> None:
        self.phase = "other"
        self.calls: dict[str, list[tuple[int, int]]] = defaultdict(list)

    def hook(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        self.calls[self.phase].append((int(ids.shape[0]), int(ids.shape[1])))

    @contextlib.contextmanager
    def during(self, phase: str):
        self.phase = phase
        try:
            yield
        finally:
            self.phase = "other"


def instrument(stage: PPOStage, counter: PhaseCounter, monkeypatch: pytest.MonkeyPatch) -> None:
    for model in (stage.actor, stage.critic, stage.reference, stage.rm_helpful, stage.rm_safety):
        model.register_forward_hook(counter.hook, with_kwargs=True)  # type: ignore[union-attr]
    for method, phase in (
        ("generate_rollout", "generate"),
        ("score", "score"),
        ("experience", "score"),  # the actor's, reference's and critic's no-grad readings
        ("ppo_update", "train"),
    ):
        original = getattr(PPOStage, method)

        def wrapped(self: PPOStage, *args: Any, _f: Any = original, _p: str = phase) -> Any:
            with counter.during(_p):
                return _f(self, *args)

        monkeypatch.setattr(PPOStage, method, wrapped)


@pytest.mark.integration
def test_rows_each_phase_runs_are_the_plans(
    tiny_checkpoints: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    world = checkpoint_paths(tiny_checkpoints)
    overrides = ["stage=ppo", f"data.max_prompt_len={PROMPT_LEN}"]
    overrides += [f"stage.{k}={v}" for k, v in SIZES.items()]
    overrides += [f"stage.max_new_tokens={NEW_TOKENS}", "stage.ppo_epochs=1"]
    cfg = compose_config(overrides, tmp_path)
    plan = plan_from_config(cfg, architecture(cfg), {})
    batch = plan.to_dict()["batch"]

    stage = make_ppo_stage(
        world, **SIZES, max_new_tokens=NEW_TOKENS, ppo_epochs=1, iterations=1, eval_every=None
    )
    counter = PhaseCounter()
    instrument(stage, counter, monkeypatch)
    data = PromptDataModule(
        tokenizer_path=str(world["tokenizer"]), max_prompt_len=PROMPT_LEN, builtin_size=16,
        builtin_val_size=4, **data_overrides(cfg, 1),
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, max_epochs=-1,
        max_steps=stage.cfg.steps_per_iteration, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(stage, datamodule=data)
    calls = counter.calls

    # One iteration: this GPU's prompts, generated generation_batch at a time.
    prompts = batch["prompts_per_gpu"]
    assert prompts == SIZES["rollout_batch"]  # one process: the whole rollout
    prefill = [rows for rows, cols in calls["generate"] if cols > 1]
    assert sum(prefill) == prompts
    assert max(rows for rows, _ in calls["generate"]) == batch["rows_per_generation_call"] == 4
    # Scoring and readings: no-grad forwards of rows_per_score_forward rows of <= P + R tokens.
    assert {rows for rows, _ in calls["score"]} == {batch["rows_per_score_forward"]}
    assert max(cols for _, cols in calls["score"]) <= batch["tokens_per_rollout_row"]
    # PPO: each micro-batch through the actor and the critic, rows_per_micro_batch rows each.
    train_rows = [rows for rows, _ in calls["train"]]
    assert set(train_rows) == {batch["rows_per_micro_batch"]} == {SIZES["micro_batch"]}
    # actor + critic per micro-batch, every rollout row once per PPO epoch
    assert sum(train_rows) == 2 * prompts
    assert max(cols for _, cols in calls["train"]) <= batch["tokens_per_row"]
    assert batch["tokens_per_row"] == PROMPT_LEN + NEW_TOKENS == plan.rollout_len
    assert (batch["mini_batches"], batch["accumulation"]) == (2, 2)
    assert plan.peak_bytes_per_gpu == plan.total_bytes_per_gpu and plan.fits
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/grad_norm"])))

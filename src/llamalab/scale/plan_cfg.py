"""The memory plan from a composed Hydra config, and the check that this machine can run it."""

from __future__ import annotations

import os
from typing import Any

import torch
from omegaconf import DictConfig

from llamalab import pipeline
from llamalab.model import LlamaConfig
from llamalab.scale.batches import batch_layout
from llamalab.scale.plan import Plan, PlanError, make_plan
from llamalab.scale.plan_gen import resolve_engine
from llamalab.scale.strategies import devices_per_node, num_nodes, world_size


def plan_from_config(cfg: DictConfig, arch: LlamaConfig, inputs: dict[str, str]) -> Plan:
    """The plan of a composed config, with the rows each phase really runs per GPU
    (:func:`llamalab.scale.batches.batch_layout`): the micro-batch of a forward/backward, and
    for PPO and rejection sampling the rows of one generate() call and of one scoring forward."""
    stage = cfg.stage
    world = world_size(cfg)
    layout = batch_layout(cfg, world)
    micro_batch = layout.micro_batch if layout is not None else int(cfg.data.get("batch_size", 1))
    seq_len = int(cfg.data.get("seq_len") or cfg.data.get("max_len") or arch.max_seq_len)
    rollout_batch, rollout_len = micro_batch, seq_len
    if stage.name in ("ppo", "rejection_sampling"):
        rollout_len = int(cfg.data.get("max_prompt_len", 128)) + int(stage.max_new_tokens)
        # Rejection sampling: K answers of generation_batch // K prompts per generate() call.
        k = int(stage.get("num_samples", 1))
        rollout_batch = max(1, int(stage.generation_batch) // k) * k
        if layout is not None and stage.name == "ppo":
            rollout_batch = layout.generation_rows  # this GPU's prompts, at most generation_batch
            seq_len = rollout_len  # PPO trains on the rollout itself
    return make_plan(
        arch,
        stage=stage.name,
        strategy=cfg.strategy.get("name", "auto"),
        precision=str(cfg.trainer.get("precision", "32")),
        devices=devices_per_node(cfg),
        num_nodes=num_nodes(cfg),
        micro_batch=micro_batch,
        seq_len=seq_len,
        activation_checkpointing=bool(stage.get("activation_checkpointing", False)),
        gpu_memory_gb=float(cfg.plan.get("gpu_memory_gb", 80)),
        rollout_batch=rollout_batch,
        rollout_len=rollout_len,
        inputs=plan_roles(stage.name, inputs, cfg.paths.outputs_root),
        model_name=str(cfg.model.name),
        checkpoints_kept=checkpoints_kept(cfg),
        batch=layout.to_dict() if layout is not None else None,
        **generation_settings(stage, cfg.data),
    )


def generation_settings(stage: DictConfig, data: DictConfig) -> dict[str, Any]:
    """The rollout engine settings of PPO and rejection sampling for the plan (the old
    ``gather_for_generation`` too): ``generation_batch`` bounds the rows of one generate() call,
    which a tensor-parallel group fills with the rows of all its GPUs."""
    if stage.name not in ("ppo", "rejection_sampling"):
        return {}
    old = stage.get("gather_for_generation")
    return {
        "rollout_engine": resolve_engine(str(stage.get("rollout_engine", "auto")), old),
        "rollout_tp_size": stage.get("rollout_tp_size"),
        "generation_batch": int(stage.get("generation_batch") or 0) or None,
        "prompt_len": int(data.get("max_prompt_len", 128)),
    }


def checkpoints_kept(cfg: DictConfig) -> int:
    """Periodic checkpoints the run keeps: ``callbacks.model_checkpoint.save_top_k``, or with
    ``-1`` (keep all) the number of periodic saves up to ``trainer.max_steps``; 0 without the
    callback (only a preemption save is written then)."""
    callback = (cfg.get("callbacks") or {}).get("model_checkpoint")
    if not callback or "_target_" not in callback:
        return 0
    top_k = int(callback.get("save_top_k", 1))
    if top_k >= 0:
        return top_k
    every, steps = callback.get("every_n_train_steps") or 0, cfg.trainer.get("max_steps", -1)
    return max(1, int(steps) // int(every)) if every and steps and steps > 0 else 1


def plan_roles(
    stage: str, inputs: dict[str, str], outputs_root: str | None = None
) -> dict[str, str]:
    """Stage config keys -> the planner's model roles (:mod:`llamalab.pipeline`: PPO's ``init``
    is actor and reference); an input not set loads its default under ``outputs_root``."""
    spec = pipeline.stage(stage)
    if spec is None:
        return dict(inputs)  # make_plan names the unknown stage
    roles: dict[str, str] = {}
    for model in spec.models:
        if model.input is None:
            continue
        path = inputs.get(model.input) or pipeline.default_input(stage, model.input, outputs_root)
        if path is not None:
            roles[model.role] = path
    return roles


def machine_memory_bytes() -> tuple[str, int]:
    """('gpu', bytes of device 0) on CUDA, else ('cpu', physical RAM)."""
    if torch.cuda.is_available():
        return "gpu", torch.cuda.get_device_properties(0).total_memory
    return "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_machine(plan: Plan, cfg: DictConfig) -> None:
    """Stop before any allocation when the plan cannot fit this machine's memory."""
    kind, available = machine_memory_bytes()
    needed: Any = plan.total_bytes_per_gpu
    if kind == "cpu":
        # CPU processes: every local rank lives in the same RAM.
        needed = needed * devices_per_node(cfg)
    if needed > available:
        raise PlanError(
            f"{plan.render()}\nthis {kind} machine has {available / 2**30:.1f} GiB; the plan "
            f"needs {needed / 2**30:.1f} GiB: it cannot run here (use more devices, a sharded "
            "strategy, activation checkpointing or a smaller model; dry_run=true prints the plan)"
        )

"""The plan as a record: the :class:`Plan` dataclass, its ``plan.json`` and its printed table.

:func:`llamalab.scale.plan.make_plan` fills it; this module only holds, serialises and renders it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from llamalab.scale.memory import GIB, PlanError
from llamalab.scale.plan_gen import render_generation


# ---- the plan ----------------------------------------------------------------------------------
@dataclass
class ModelRow:
    """One model of the plan. ``gathered_params``: the layer/unit a sharded strategy gathers."""

    role: str
    head: str
    trainable: bool
    n_params: int
    gathered_params: int
    gpu_bytes: int  # model states (trained) or weights (frozen) per GPU
    cpu_bytes: int  # per node: DeepSpeed offload / staging, 0 otherwise
    input: str | None


@dataclass
class Plan:
    """Everything ``dry_run`` prints; exact bytes and parameter counts, JSON-serialisable."""

    model: str
    config: dict[str, Any]
    stage: str
    strategy: str
    precision: str
    num_nodes: int
    devices: int  # GPUs per node
    world_size: int
    micro_batch: int
    seq_len: int
    activation_checkpointing: bool
    rollout_batch: int
    rollout_len: int
    gpu_memory_gb: float  # GiB
    models: list[ModelRow]
    total_params: int
    model_state_bytes: int  # all models, per GPU
    activation_bytes: int  # train phase at the configured checkpointing
    activation_bytes_checkpointed: int
    activation_bytes_full: int
    kv_cache_bytes: int
    phase_bytes: dict[str, int]  # on top of the model states: train / rollout / score
    peak_phase: str
    total_bytes_per_gpu: int
    fits: bool
    reason: str
    # Disk: one training checkpoint (all ranks' files), the largest part one rank writes, how
    # many periodic checkpoints are kept, and the disk they need while the next one is written.
    checkpoint_bytes: int = 0
    checkpoint_bytes_per_gpu: int = 0
    checkpoints_kept: int = 0
    checkpoint_disk_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    # The batch rule's figures (llamalab.scale.plan.batch_section) and the verdict's peak.
    batch: dict[str, Any] = field(default_factory=dict)
    peak_bytes_per_gpu: int = 0
    # PPO's rollout engine: engine, tp_size, weights_bytes_per_gpu, kv_cache_bytes_per_gpu,
    # seconds_per_token by engine, ... (llamalab.scale.plan_gen.generation_plan)
    generation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Plan:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PlanError(f"unknown plan field(s) {unknown}")
        rows = [ModelRow(**row) for row in values["models"]]
        return cls(**{**values, "models": rows})

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write ``plan.json`` atomically (a temporary file in the same folder, then rename)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, target)
        return target

    def render(self) -> str:
        """A readable table: exact parameter counts, memory in GiB, the verdict."""
        return "\n".join(_render_lines(self))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:.2f}"


def _batch_lines(batch: dict[str, Any]) -> list[str]:
    """The batch rule in one line: global batch -> per GPU -> micro-batches (PPO: mini-batches)."""
    if not batch.get("global_batch"):
        return []
    unit, per_rank = batch["unit"], batch["per_rank"]
    line = (
        f"  batch: {batch['global_batch']} {unit} global = {per_rank} per GPU x "
        f"{batch['world']} GPUs"
    )
    if batch.get("mini_batch"):
        line += (
            f"; mini-batch {batch['mini_batch']} global = {batch['mini_per_rank']} per GPU "
            f"({batch['mini_batches']} optimizer steps per epoch), micro-batch "
            f"{batch['micro_batch']} x {batch['accumulation']}"
        )
    else:
        line += f" = micro-batch {batch['micro_batch']} x {batch['accumulation']} accumulated"
    return [line]


def _render_lines(plan: Plan) -> list[str]:
    cfg = plan.config
    kv = cfg["n_kv_heads"] or cfg["n_heads"]
    ckpt = "on" if plan.activation_checkpointing else "off"
    lines = [
        f"Plan: model {plan.model}, stage {plan.stage}, {_count(plan.num_nodes, 'node')} x "
        f"{_count(plan.devices, 'GPU')} = {_count(plan.world_size, 'GPU')}, {plan.strategy}, "
        f"{plan.precision}",
        f"  architecture: dim {cfg['dim']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, "
        f"{kv} KV heads, vocab {cfg['vocab_size']}",
        f"  per GPU: micro-batch {plan.micro_batch} x {plan.seq_len} tokens, activation "
        f"checkpointing {ckpt}; rollouts {plan.rollout_batch} x {plan.rollout_len} tokens",
        *_batch_lines(plan.batch),
        "",
        f"  {'role':<15} {'head':<6} {'trained':<7} {'parameters':>17} {'GPU GiB':>8} "
        f"{'CPU GiB/node':>12}  loads",
    ]
    for row in plan.models:
        lines.append(
            f"  {row.role:<15} {row.head:<6} {'yes' if row.trainable else 'no':<7} "
            f"{row.n_params:>17,} {format_gib(row.gpu_bytes):>8} {format_gib(row.cpu_bytes):>12}  "
            f"{row.input or '(random init)'}"
        )
    lines += [
        f"  {'all models':<30} {plan.total_params:>17,} {format_gib(plan.model_state_bytes):>8}",
        "",
        f"  model states per GPU      {format_gib(plan.model_state_bytes):>8} GiB",
        f"  activations (train)       {format_gib(plan.activation_bytes_checkpointed):>8} GiB with "
        f"checkpointing, {format_gib(plan.activation_bytes_full)} GiB without (using: {ckpt})",
        f"  KV cache (rollout)        {format_gib(plan.kv_cache_bytes):>8} GiB",
        "  on top of model states    "
        + ", ".join(f"{k} {format_gib(v)} GiB" for k, v in plan.phase_bytes.items()),
        f"  peak per GPU              {format_gib(plan.total_bytes_per_gpu):>8} GiB of "
        f"{plan.gpu_memory_gb:.2f} GiB ({plan.peak_phase} phase)",
        f"  verdict: {'FITS' if plan.fits else 'DOES NOT FIT'}: {plan.reason}",
        f"  checkpoint per save       {format_gib(plan.checkpoint_bytes):>8} GiB on disk "
        f"({format_gib(plan.checkpoint_bytes_per_gpu)} GiB written by each GPU's rank)",
        f"  checkpoint disk           {format_gib(plan.checkpoint_disk_bytes):>8} GiB "
        f"({plan.checkpoints_kept} kept + 1 being written; last.ckpt is a link)",
    ]
    if plan.generation is not None:
        lines += render_generation(plan.generation, GIB)
    if plan.notes:
        lines += ["  notes:"] + [f"   - {note}" for note in plan.notes]
    return lines

"""The memory plan of a run: parameters, memory per GPU and a fit verdict, with no allocation.

``make_plan`` answers, from a :class:`LlamaConfig` and the run's settings alone (plain integer
arithmetic; no torch, no model), what ``python src/train.py ... dry_run=true`` prints: the exact
parameter count of every model the stage holds, model-state memory per GPU for the strategy,
activation memory per GPU (with and without activation checkpointing), KV-cache memory for
rollouts, and whether the peak fits the GPU. ``check_fits`` is the same check before a real run.

Where the pieces live: the byte formulas of one model (model states per strategy, activations,
KV cache) are in :mod:`llamalab.scale.memory`; the :class:`Plan` record, its ``plan.json`` and its
printed table in :mod:`llamalab.scale.plan_report`. This module says which models a stage holds,
sums their bytes per phase and gives the verdict.

Units: exact integer bytes; ``gpu_memory_gb`` is read as GiB (an "80GB" H100 has 80 GiB).

What is counted per GPU (peak = model states + the largest phase):
- model states: weights, gradients and optimizer states (AdamW), per strategy (see
  ``model_state_bytes``); ZeRO figures mirror DeepSpeed's estimators exactly (tests compare them);
  frozen models (reference, reward models) cost their weights only (``frozen_weight_bytes``).
- phases: ``train`` (the activations of every trained model, summed: PPO's actor and critic
  losses may share one backward), ``rollout`` (KV cache + one no-grad forward of the policy at
  the rollout batch, PPO and rejection sampling), ``score`` (no-grad forward of a scoring model).
Disk per training checkpoint: the trained models' weights and AdamW states
(``checkpoint_bytes_per_param``; frozen models are reloaded from their paths, not saved), and
the disk the kept checkpoints need while the next one is written (a save is committed before
the oldest is removed).
The rollout phase of PPO and rejection sampling is their generation engine's
(:mod:`llamalab.scale.plan_gen`): the inference copy (whole, tensor-parallel slice, or none), the
KV cache of one generate call and one forward.
Not counted: the CUDA context and NCCL buffers (about 0.5-1 GiB), allocator fragmentation, the
temporaries of backward itself (gradients of one block's activations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llamalab import pipeline
from llamalab.model.config import LlamaConfig
from llamalab.scale.batches import batch_section
from llamalab.scale.memory import (
    GIB,
    Numerics,
    PlanError,
    activation_breakdown,
    check_strategy,
    checkpoint_bytes_per_param,
    compute_bytes,
    frozen_weight_bytes,
    fsdp_unit_params,
    kv_cache_bytes,
    largest_layer_params,
    model_state_bytes,
    normalize_precision,
    numerics,
)
from llamalab.scale.plan_gen import engine_advice, rollout_phase
from llamalab.scale.plan_report import ModelRow, Plan, format_gib

STAGES = tuple(pipeline.STAGES)

# Cluster each size is planned for unless trainer.devices / trainer.num_nodes say otherwise:
# (num_nodes, devices per node). 70B on 8 x 8 A100-80GB follows the paper's scale (PAPER.md, PPO).
DEFAULT_CLUSTERS: dict[str, tuple[int, int]] = {
    "tiny": (1, 1),
    "small": (1, 1),
    "base": (1, 1),
    "1b": (1, 1),
    "7b": (1, 8),
    "13b": (2, 8),
    "70b": (8, 8),
}


def default_cluster(model_name: str) -> tuple[int, int]:
    """``(num_nodes, devices_per_node)`` a named size is planned for (DEFAULT_CLUSTERS)."""
    key = model_name.lower()
    if key not in DEFAULT_CLUSTERS:
        raise PlanError(f"no default cluster for {model_name!r}; known: {sorted(DEFAULT_CLUSTERS)}")
    return DEFAULT_CLUSTERS[key]


# Stages whose micro-batch counts preference pairs: a chosen and a rejected row each.
PAIR_STAGES = ("reward", "dpo")


# ---- which models a stage holds ----------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """One model of a stage: ``head`` is ``"lm"`` (vocab logits) or ``"scalar"`` (one score)."""

    role: str
    head: str
    trainable: bool
    input: str | None  # what the real run would load (None: random initialisation)


@dataclass(frozen=True)
class StageModels:
    """The models a stage holds at once, with the input each would load."""

    stage: str
    models: tuple[ModelSpec, ...]

    @classmethod
    def for_stage(cls, stage: str, inputs: dict[str, str] | None = None) -> StageModels:
        """The stage's models (:mod:`llamalab.pipeline`); ``inputs`` (role -> path) override by
        role the defaults (the producing run's ``latest`` under ``$LLAMALAB_OUTPUTS`` or
        ``outputs``)."""
        spec = pipeline.stage(stage)
        if spec is None:
            raise PlanError(f"unknown stage {stage!r}; choose one of {list(STAGES)}")
        given = dict(inputs or {})
        unknown = sorted(set(given) - {m.role for m in spec.models})
        if unknown:
            raise PlanError(f"stage {stage!r} has no model(s) {unknown}; inputs name roles")
        models = tuple(
            ModelSpec(
                m.role,
                m.head,
                m.trainable,
                given.get(m.role, pipeline.default_input(stage, m.input) if m.input else None),
            )
            for m in spec.models
        )
        return cls(stage, models)


def _model_rows(
    config: LlamaConfig,
    specs: tuple[ModelSpec, ...],
    strategy: str,
    devices: int,
    num_nodes: int,
    precision: str,
) -> list[ModelRow]:
    rows = []
    for spec in specs:
        n_params = config.num_params(spec.head)
        if strategy == "fsdp":
            gathered = fsdp_unit_params(config, spec.head)
        elif strategy.startswith("deepspeed_zero3"):
            gathered = largest_layer_params(config, spec.head)
        else:
            gathered = 0
        cost = model_state_bytes if spec.trainable else frozen_weight_bytes
        gpu, cpu = cost(n_params, gathered, strategy, devices, num_nodes, precision)
        rows.append(
            ModelRow(spec.role, spec.head, spec.trainable, n_params, gathered, gpu, cpu, spec.input)
        )
    return rows


def _phase_bytes(
    config: LlamaConfig,
    specs: tuple[ModelSpec, ...],
    num: Numerics,
    train_rows: int,
    seq_len: int,
    checkpointing: bool,
    rollout: tuple[int, int] | None,
) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes on top of the model states in each phase, and the activation figures."""
    acts = {
        spec.role: activation_breakdown(config, train_rows, seq_len, num, spec.head)
        for spec in specs
        if spec.trainable
    }
    full = sum(a.full for a in acts.values())
    ckpt = sum(a.checkpointed for a in acts.values())
    phases = {"train": ckpt if checkpointing else full}
    figures = {"full": full, "checkpointed": ckpt, "kv": 0}
    if rollout is not None:
        batch, length = rollout
        policy = next(s for s in specs if s.head == "lm" and s.trainable)
        kv = kv_cache_bytes(config, batch, length, num.compute_bytes)
        infer = {s.role: activation_breakdown(config, batch, length, num, s.head) for s in specs}
        phases["rollout"] = kv + infer[policy.role].inference
        phases["score"] = max(a.inference for a in infer.values())
        figures["kv"] = kv
    return phases, figures


def _validate_positive(**values: int) -> None:
    bad = [f"{k}={v!r}" for k, v in values.items() if not isinstance(v, int) or v <= 0]
    if bad:
        raise PlanError("plan inputs must be positive integers: " + ", ".join(bad))


def make_plan(
    config: LlamaConfig,
    stage: str,
    strategy: str,
    precision: str,
    devices: int,
    num_nodes: int,
    micro_batch: int,
    seq_len: int,
    activation_checkpointing: bool,
    gpu_memory_gb: float = 80.0,
    rollout_batch: int | None = None,
    rollout_len: int | None = None,
    inputs: dict[str, str] | None = None,
    model_name: str | None = None,
    checkpoints_kept: int = 1,
    batch: dict[str, Any] | None = None,
    rollout_engine: str = "auto",
    rollout_tp_size: int | None = None,
    generation_batch: int | None = None,
    prompt_len: int | None = None,
) -> Plan:
    """The memory plan of a run, from numbers alone (no model is built, nothing is allocated).

    ``devices``: GPUs per node; ``micro_batch``: sequences per GPU per step (pairs for the
    reward and DPO stages, whose batches hold chosen and rejected rows); ``rollout_batch`` /
    ``rollout_len``: sequences generated at once per GPU and their prompt + response length
    (default: ``micro_batch`` and ``seq_len``; PPO and rejection sampling only);
    ``checkpoints_kept``: periodic checkpoints kept on disk (``save_top_k``); ``batch``: the
    run's :class:`llamalab.scale.batches.BatchLayout` as a dict (global batch and its per-GPU
    share), reported in ``plan.json``'s ``batch`` section with the rows of each phase.
    PPO's and
    rejection sampling's ``rollout_engine`` / ``rollout_tp_size`` / ``generation_batch`` (rows per
    generate call) set their generation section (:mod:`llamalab.scale.plan_gen`); ``prompt_len``: the longest
    prompt, the prefill's length (default: ``rollout_len``).
    """
    check_strategy(strategy)
    precision = normalize_precision(precision)
    rollout_batch = micro_batch if rollout_batch is None else rollout_batch
    rollout_len = seq_len if rollout_len is None else rollout_len
    _validate_positive(
        devices=devices, num_nodes=num_nodes, micro_batch=micro_batch, seq_len=seq_len,
        rollout_batch=rollout_batch, rollout_len=rollout_len,
    )  # fmt: skip
    if gpu_memory_gb <= 0:
        raise PlanError(f"gpu_memory_gb must be positive, got {gpu_memory_gb}")
    specs = StageModels.for_stage(stage, inputs).models
    rows = _model_rows(config, specs, strategy, devices, num_nodes, precision)
    num = numerics(strategy, precision)
    generates = stage in ("ppo", "rejection_sampling")
    train_rows = 2 * micro_batch if stage in PAIR_STAGES else micro_batch
    phases, figures = _phase_bytes(
        config, specs, num, train_rows, seq_len, activation_checkpointing,
        (rollout_batch, rollout_len) if generates else None,
    )  # fmt: skip
    states = sum(row.gpu_bytes for row in rows)
    generation = None
    if generates:  # the rollout phase: the engine's inference copy, its KV cache, one forward
        generation, phases["rollout"] = rollout_phase(
            config, num, devices, num_nodes, rollout_engine, rollout_tp_size, rollout_batch,
            generation_batch or rollout_batch, rollout_len, prompt_len,
            int(gpu_memory_gb * GIB) - states,
        )  # fmt: skip
        figures["kv"] = generation["kv_cache_bytes_per_gpu"]
    ckpt, ckpt_per_gpu = _checkpoint_bytes(rows, strategy, precision, devices * num_nodes)
    peak_phase = max(phases, key=lambda k: phases[k])
    total = states + phases[peak_phase]
    plan = Plan(
        model=model_name or "custom",
        config=config.to_dict(),
        stage=stage,
        strategy=strategy,
        precision=precision,
        num_nodes=num_nodes,
        devices=devices,
        world_size=devices * num_nodes,
        micro_batch=micro_batch,
        seq_len=seq_len,
        activation_checkpointing=activation_checkpointing,
        rollout_batch=rollout_batch if generates else 0,
        rollout_len=rollout_len if generates else 0,
        gpu_memory_gb=float(gpu_memory_gb),
        models=rows,
        total_params=sum(row.n_params for row in rows),
        model_state_bytes=states,
        activation_bytes=phases["train"],
        activation_bytes_checkpointed=figures["checkpointed"],
        activation_bytes_full=figures["full"],
        kv_cache_bytes=figures["kv"],
        phase_bytes=phases,
        peak_phase=peak_phase,
        total_bytes_per_gpu=total,
        fits=total <= gpu_memory_gb * GIB,
        reason="",
        checkpoint_bytes=ckpt,
        checkpoint_bytes_per_gpu=ckpt_per_gpu,
        checkpoints_kept=checkpoints_kept,
        checkpoint_disk_bytes=(checkpoints_kept + 1) * ckpt,
        notes=_notes(config, strategy, precision, stage, seq_len),
        batch=batch_section(batch, stage, micro_batch, seq_len, rollout_batch, rollout_len),
        peak_bytes_per_gpu=total,
        generation=generation,
    )
    plan.reason = _reason(plan, config, specs)
    return plan


def _checkpoint_bytes(
    rows: list[ModelRow], strategy: str, precision: str, world: int
) -> tuple[int, int]:
    """(bytes of one checkpoint, the most one rank writes): sharded strategies split the
    optimizer's part over the ranks (ZeRO-2's module weights are rank 0's); DDP's rank 0 writes
    it all."""
    trained = sum(row.n_params for row in rows if row.trainable)
    per_param = checkpoint_bytes_per_param(strategy, precision)
    total = trained * per_param
    if strategy == "fsdp" or strategy.startswith("deepspeed_zero3"):
        return total, -(-total // world)
    if strategy == "deepspeed_zero2":
        weights = trained * (per_param - 12)
        return total, -(-(total - weights) // world) + weights
    return total, total


def _notes(
    config: LlamaConfig, strategy: str, precision: str, stage: str, seq_len: int
) -> list[str]:
    notes = [
        "attention through SDPA's flash kernel (no seq x seq matrix is stored)",
        f"frozen models are held in the compute dtype ({compute_bytes(precision)} bytes/param)",
        "not counted: CUDA context and NCCL buffers (about 0.5-1 GiB), fragmentation, "
        "backward temporaries",
    ]
    if stage == "ppo":
        notes.append("train phase: actor and critic activations held together (one backward)")
    if strategy.startswith("deepspeed") and precision == "32-true":
        notes.append("DeepSpeed's estimator assumes 16-bit training with fp32 master weights")
    if seq_len > config.max_seq_len:
        notes.append(f"seq_len {seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    return notes


def _reason(plan: Plan, config: LlamaConfig, specs: tuple[ModelSpec, ...]) -> str:
    budget = plan.gpu_memory_gb * GIB
    extra = plan.phase_bytes[plan.peak_phase]
    split = (
        f"{format_gib(plan.model_state_bytes)} GiB model states + {format_gib(extra)} GiB "
        f"{plan.peak_phase}-phase activations/cache"
    )
    if plan.fits:
        spare = (budget - plan.total_bytes_per_gpu) / GIB
        return (
            f"{format_gib(plan.total_bytes_per_gpu)} GiB per GPU ({split}), {spare:.2f} GiB spare"
        )
    hints = []
    sharded = plan.strategy == "fsdp" or plan.strategy.startswith("deepspeed_zero3")
    if plan.model_state_bytes + extra > budget and not sharded:
        hints.append(f"{plan.strategy} replicates model states: shard them with deepspeed_zero3")
    gpus = (
        _min_gpus(plan, config, specs, plan.devices if plan.devices > 1 else 8) if sharded else None
    )
    if gpus is not None:
        hints.append(
            f"{plan.strategy} fits on {gpus} GPUs ({gpus // plan.devices} nodes x {plan.devices})"
        )
    elif sharded:
        hints.append(f"{plan.strategy} does not fit even on 4096 GPUs at this batch")
    if not plan.activation_checkpointing:
        hints.append(
            "activation_checkpointing=true cuts train activations to "
            f"{format_gib(plan.activation_bytes_checkpointed)} GiB"
        )
    if plan.generation is not None and engine_advice(plan.generation):
        hints.append(engine_advice(plan.generation))
    if plan.micro_batch > 1 and plan.peak_phase == "train":
        hints.append("a smaller micro-batch cuts activations in proportion")
    return (
        f"needs {format_gib(plan.total_bytes_per_gpu)} GiB per GPU ({split}) but the GPU has "
        f"{plan.gpu_memory_gb:.2f} GiB" + ("; " + "; ".join(hints) if hints else "")
    )


def _min_gpus(
    plan: Plan, config: LlamaConfig, specs: tuple[ModelSpec, ...], per_node: int
) -> int | None:
    """Fewest GPUs (whole nodes of ``per_node``) on which the same run fits, up to 4096.

    Sharded model states only shrink as nodes are added, so a bisection over node counts works.
    """
    extra = plan.phase_bytes[plan.peak_phase]

    def fits(nodes: int) -> bool:
        rows = _model_rows(config, specs, plan.strategy, per_node, nodes, plan.precision)
        return sum(row.gpu_bytes for row in rows) + extra <= plan.gpu_memory_gb * GIB

    low, high = 1, max(1, 4096 // per_node)
    if not fits(high):
        return None
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    return low * per_node


def check_fits(plan: Plan) -> None:
    """Raise :class:`PlanError` (the rendered plan and the reason) when the run cannot fit."""
    if not plan.fits:
        raise PlanError(f"this run cannot fit: {plan.reason}\n\n{plan.render()}")

"""The memory plan of a run: parameters, memory per GPU and a fit verdict, with no allocation.

``make_plan`` answers, from a :class:`LlamaConfig` and the run's settings alone (plain integer
arithmetic; no torch, no model), what ``python src/train.py ... dry_run=true`` prints: the exact
parameter count of every model the stage holds, model-state memory per GPU for the strategy,
activation memory per GPU (with and without activation checkpointing), KV-cache memory for
rollouts, and whether the peak fits the GPU. ``check_fits`` is the same check before a real run.

Units: bytes are exact integers; the only float is ``gpu_memory_gb``, read as GiB (2**30 bytes:
an "80GB" A100/H100 has 80 GiB = 81,920 MiB). DeepSpeed's own tables also print GiB as "GB".

What is counted per GPU (peak = model states + the largest phase):
- model states: weights, gradients and optimizer states (AdamW), per strategy (see
  ``model_state_bytes``); ZeRO figures mirror DeepSpeed's estimators exactly (tests compare them);
  frozen models (reference, reward models) cost their weights only (``frozen_weight_bytes``).
- phases: ``train`` (the activations of every trained model, summed: PPO's actor and critic
  losses may share one backward), ``rollout`` (KV cache + one no-grad forward of the policy at
  the rollout batch, PPO and rejection sampling), ``score`` (no-grad forward of a scoring model).
Not counted: the CUDA context and NCCL buffers (about 0.5-1 GiB), allocator fragmentation, the
temporaries of backward itself (gradients of one block's activations), and a policy copy that a
generation engine might consolidate for fast rollouts (PAPER.md, RLHF with PPO).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

from llamalab import pipeline
from llamalab.model.config import LlamaConfig

GIB = 2**30
STAGES = tuple(pipeline.STAGES)
STRATEGIES = (
    "auto",
    "ddp",
    "fsdp",
    "deepspeed_zero2",
    "deepspeed_zero3",
    "deepspeed_zero3_offload",
)
# Lightning's precision names (and its short aliases) -> the canonical name.
_PRECISION_ALIASES = {
    "32": "32-true",
    "32-true": "32-true",
    "16": "16-mixed",
    "16-mixed": "16-mixed",
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
    "16-true": "16-true",
    "bf16-true": "bf16-true",
}
# DeepSpeed's defaults for its estimators (`additional_buffer_factor`): CPU-side slack.
ZERO_ADDITIONAL_BUFFER_FACTOR = 1.5

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


class PlanError(ValueError):
    """A run that cannot fit (the message holds the rendered plan), or impossible plan inputs."""


def default_cluster(model_name: str) -> tuple[int, int]:
    """``(num_nodes, devices_per_node)`` a named size is planned for (DEFAULT_CLUSTERS)."""
    key = model_name.lower()
    if key not in DEFAULT_CLUSTERS:
        raise PlanError(f"no default cluster for {model_name!r}; known: {sorted(DEFAULT_CLUSTERS)}")
    return DEFAULT_CLUSTERS[key]


def normalize_precision(precision: str | int) -> str:
    """Lightning's precision setting (``"bf16-mixed"``, ``"bf16"``, ``32`` ...) -> canonical."""
    key = str(precision)
    if key not in _PRECISION_ALIASES:
        raise PlanError(
            f"unsupported precision {precision!r}; choose one of {sorted(_PRECISION_ALIASES)}"
        )
    return _PRECISION_ALIASES[key]


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; choose one of {list(STRATEGIES)}")


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


# ---- layer sizes, as the sharding strategies see them ------------------------------------------
def largest_layer_params(config: LlamaConfig, head: str = "lm") -> int:
    """Parameters of the largest single module (DeepSpeed's ``model_to_params`` definition).

    ZeRO-3 gathers one module's parameters at a time: the biggest of the embedding / LM head
    (vocab x dim), a FFN projection (dim x hidden) and ``wq`` (dim x dim).
    """
    d = config.dim
    sizes = [config.vocab_size * d, d * config.hidden_dim, d * d]
    if head == "lm":
        sizes.append(config.vocab_size * d)
    return max(sizes)


def fsdp_unit_params(config: LlamaConfig, head: str = "lm") -> int:
    """Parameters of the largest FSDP unit: one transformer block, or the root unit
    (embedding + final norm + head), assuming the strategy wraps each block separately."""
    block = config.num_params("none") - config.vocab_size * config.dim - config.dim
    block //= config.n_layers
    root = config.num_params(head) - config.n_layers * block
    return max(block, root)


# ---- ZeRO formulas (DeepSpeed's estimators, reproduced) ----------------------------------------
def zero3_model_states_mem_needs(
    total_params: int,
    largest_layer_params: int,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    cpu_offload: bool = True,
    cpu_offload_params: bool = True,
    zero_init: bool = True,
    additional_buffer_factor: float = ZERO_ADDITIONAL_BUFFER_FACTOR,
) -> tuple[int, int, int]:
    """``(cpu_bytes_per_node, gpu_bytes, largest_layer_bytes)`` of ZeRO-3 model states.

    The ZeRO paper's accounting (Rajbhandari et al. 2020) as DeepSpeed's
    ``estimate_zero3_model_states_mem_needs`` writes it: 18 bytes/param sharded over all GPUs
    (16-bit param 2 + 16-bit grad 2 + fp32 grad 4 + fp32 master 4 + Adam m, v 8) plus a gathered
    16-bit param + grad of the largest layer (4 bytes/param). Offloading the optimizer keeps only
    the 16-bit param shard (2/param) on the GPU; offloading params too keeps only the gathered
    layer. CPU figures are per node and carry the 1.5 buffer factor. The arithmetic runs in
    floats in DeepSpeed's order so that ``int()`` truncates to the same byte.
    """
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = 1 / num_nodes
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        per_param = 18 if cpu_offload_params else 16
        gpu = largest_layer_memory
        if not cpu_offload_params:
            gpu += int(2 * total_params / total_gpus)
        if zero_init:
            cpu = total_params * per_param * gpus_factor * additional_buffer_factor
        else:
            worst = max(4 * num_gpus_per_node, per_param * gpus_factor)
            cpu = total_params * worst * additional_buffer_factor
    else:
        gpu = largest_layer_memory + int(18 * total_params / total_gpus)
        # Without zero.Init every rank of a node first builds the whole fp32 model on the CPU.
        on_cpu = largest_layer_params if zero_init else total_params
        cpu = on_cpu * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu), int(gpu), largest_layer_memory


def zero2_model_states_mem_needs(
    total_params: int,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    cpu_offload: bool = True,
    additional_buffer_factor: float = ZERO_ADDITIONAL_BUFFER_FACTOR,
) -> tuple[int, int]:
    """``(cpu_bytes_per_node, gpu_bytes)`` of ZeRO-2 (DeepSpeed's
    ``estimate_zero2_model_states_mem_needs``): the 16-bit params (2/param) are replicated, the
    other 18 bytes/param (16-bit + fp32 grads, fp32 master, Adam m, v) sharded over all GPUs;
    with optimizer offload only the 16-bit params stay on the GPU."""
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu = 2 * total_params
        cpu = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
    else:
        gpu = 2 * total_params + int(18 * total_params / total_gpus)
        cpu = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu), int(gpu)


# ---- model states per strategy -----------------------------------------------------------------
class StateBytes(NamedTuple):
    """Model-state bytes: ``gpu`` per GPU, ``cpu`` per node (DeepSpeed offload / staging)."""

    gpu: int
    cpu: int


def compute_bytes(precision: str) -> int:
    """Bytes of the dtype matmuls and activations run in: 4 for 32-true, else 2."""
    return 4 if normalize_precision(precision) == "32-true" else 2


def _replicated_bytes_per_param(precision: str) -> int:
    """Trained-model bytes/param under DDP (AdamW):
    - ``32-true``: fp32 param 4 + grad 4 + Adam m, v 8 = 16;
    - ``*-mixed``: the same 16 + 2 for autocast's 16-bit copy of every weight, which autocast
      caches through the forward and backward keeps (measured; the embedding is not cast, so this
      overstates by 2 x vocab x dim);
    - ``*-true`` (16-bit): param 2 + grad 2 + Adam m, v 4 (torch's AdamW keeps its states in the
      param dtype) = 8.
    DDP's gradient buckets are assumed to be views of the grads (``gradient_as_bucket_view``).
    """
    precision = normalize_precision(precision)
    if precision == "32-true":
        return 16
    return 18 if precision.endswith("mixed") else 8


def model_state_bytes(
    n_params: int,
    largest_layer_params: int,
    strategy: str,
    n_gpus_per_node: int,
    n_nodes: int,
    precision: str,
    offload: bool = False,
) -> StateBytes:
    """Weights + grads + AdamW states of one trained model, per GPU (and CPU per node).

    ``largest_layer_params``: DeepSpeed's largest module for ZeRO-3, the largest wrapped unit
    for FSDP (ignored by the replicated strategies). ``auto`` plans as DDP (what Lightning
    picks on several GPUs; one device holds the same). ZeRO figures are DeepSpeed's formulas
    (16-bit training with fp32 master weights; ``zero_init`` True for ZeRO-3).
    ``offload``: optimizer (ZeRO-2) or optimizer + params (ZeRO-3) on the CPU.
    """
    _check_strategy(strategy)
    world = n_gpus_per_node * n_nodes
    if strategy == "deepspeed_zero2":
        cpu, gpu = zero2_model_states_mem_needs(n_params, n_gpus_per_node, n_nodes, offload)
        return StateBytes(gpu, cpu)
    if strategy.startswith("deepspeed_zero3"):
        off = offload or strategy == "deepspeed_zero3_offload"
        cpu, gpu, _ = zero3_model_states_mem_needs(
            n_params, largest_layer_params, n_gpus_per_node, n_nodes, off, off, True
        )
        return StateBytes(gpu, cpu)
    if offload:
        raise PlanError(f"strategy {strategy!r} has no offload; use deepspeed_zero3_offload")
    if strategy == "fsdp":
        # fp32 sharded param + grad + Adam (16/param; 8 for 16-bit-true) over all GPUs, plus the
        # gathered param and unsharded grad of one unit in the compute dtype.
        sharded = 8 if normalize_precision(precision).endswith("16-true") else 16
        gathered = 2 * compute_bytes(precision) * largest_layer_params
        return StateBytes(math.ceil(sharded * n_params / world) + gathered, 0)
    return StateBytes(_replicated_bytes_per_param(precision) * n_params, 0)


def model_state_bytes_per_gpu(
    n_params: int,
    largest_layer_params: int,
    strategy: str,
    n_gpus_per_node: int,
    n_nodes: int,
    precision: str,
    offload: bool = False,
) -> int:
    """GPU bytes of :func:`model_state_bytes`."""
    return model_state_bytes(
        n_params, largest_layer_params, strategy, n_gpus_per_node, n_nodes, precision, offload
    ).gpu


def frozen_weight_bytes(
    n_params: int,
    largest_layer_params: int,
    strategy: str,
    n_gpus_per_node: int,
    n_nodes: int,
    precision: str,
) -> StateBytes:
    """A frozen model (no grads, no optimizer): its weights in the compute dtype only.

    Replicated under auto / DDP / ZeRO-2 (frozen models are not in the optimizer's engine);
    sharded over all GPUs under FSDP / ZeRO-3 plus one gathered layer (params only); under
    ZeRO-3 offload the shards sit in CPU memory and the GPU holds the gathered layer.
    """
    _check_strategy(strategy)
    width = compute_bytes(precision)
    world = n_gpus_per_node * n_nodes
    if strategy in ("auto", "ddp", "deepspeed_zero2"):
        return StateBytes(width * n_params, 0)
    gathered = width * largest_layer_params
    if strategy == "deepspeed_zero3_offload":
        return StateBytes(gathered, math.ceil(width * n_params / n_nodes))
    return StateBytes(math.ceil(width * n_params / world) + gathered, 0)


# ---- activations and KV cache ------------------------------------------------------------------
class Numerics(NamedTuple):
    """How a strategy + precision run the forward: see :func:`numerics`."""

    compute_bytes: int  # matmul inputs/outputs, attention, FFN
    residual_bytes: int  # the residual stream, norms' outputs, RoPE tables
    autocast: bool  # fp32 weights cast per use: each Linear saves its own 16-bit input copy


def numerics(strategy: str, precision: str) -> Numerics:
    """DDP / auto with ``*-mixed`` keep fp32 weights under autocast (fp32 residual stream);
    FSDP casts params to 16-bit (``MixedPrecision``) and DeepSpeed casts the module, so their
    activations are those of 16-bit-true (Lightning's precision plugins)."""
    precision = normalize_precision(precision)
    width = compute_bytes(precision)
    if strategy in ("auto", "ddp") and precision.endswith("mixed"):
        return Numerics(width, 4, True)
    return Numerics(width, width, False)


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes autograd keeps for one forward at a given micro-batch: see ``activation_breakdown``."""

    n_layers: int
    per_layer: int  # one transformer block
    block_input: int  # one block's input, all a checkpointed block keeps
    outside: int  # embedding indices, RoPE tables, final norm
    head: int  # LM: float32 logits, log-softmax, int64 targets; scalar: float32 values

    @property
    def full(self) -> int:
        return self.n_layers * self.per_layer + self.outside + self.head

    @property
    def checkpointed(self) -> int:
        """Every block's input, plus one block recomputed in backward."""
        return self.n_layers * self.block_input + self.per_layer + self.outside + self.head

    @property
    def inference(self) -> int:
        """Upper bound for a no-grad forward: one block's worth of tensors plus the head."""
        return self.per_layer + self.outside + self.head


def _norm_bytes(dim: int, residual: int, out_copies: int, num: Numerics) -> int:
    """RMSNorm per token: its float32 input (kept by pow/mul) + rsqrt (4) + ``normed`` in the
    residual dtype (kept by ``weight *``) + the output the next Linears keep (one 16-bit copy per
    Linear under autocast)."""
    out = out_copies * num.compute_bytes * dim if num.autocast else residual * dim
    return 4 * dim + 4 + residual * dim + out


def activation_breakdown(
    config: LlamaConfig,
    micro_batch: int,
    seq_len: int,
    numerics_: Numerics,
    head: str = "lm",
) -> ActivationBytes:
    """What autograd saves for backward, tensor by tensor (our model; verified exactly on CPU).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation") count ``s*b*h*(34 + 5*a*s/h)``
    bytes per GPT layer. Adapted to LLaMA per token and layer (h = dim, kv = KV heads x head_dim,
    f = FFN hidden, c = compute bytes): two RMSNorms (``_norm_bytes``); q, k, v after RoPE kept
    by attention (c*(h + 2*kv): GQA shrinks K/V, and SDPA takes them unrepeated); the attention
    output (c*h, shared with ``wo``'s input) and float32 log-sum-exp (4 per head); SwiGLU keeps
    four f-wide tensors (w1 out, silu out, w3 out, their product: 4*c*f). No dropout in LLaMA.
    Assumes SDPA's flash kernel: no s x s attention matrix (the 5*a*s/h term is gone).
    """
    h, kv, f = config.dim, config.kv_heads * config.head_dim, config.hidden_dim
    c, r = numerics_.compute_bytes, numerics_.residual_bytes
    layer = (
        _norm_bytes(h, r, 3, numerics_)
        + _norm_bytes(h, r, 2, numerics_)
        + c * (h + 2 * kv)
        + c * h
        + 4 * config.n_heads
        + 4 * c * f
    )
    rope = 2 * r * config.head_dim  # cos and sin gathered at the positions (shared by layers)
    outside = 8 + rope + _norm_bytes(h, r, 1, numerics_)  # + int64 token ids of the embedding
    # LM: float32 logits + float32 log-softmax (kept by cross-entropy) + int64 targets.
    head_bytes = 8 * config.vocab_size + 8 if head == "lm" else 4
    tokens = micro_batch * seq_len
    return ActivationBytes(
        config.n_layers, tokens * layer, tokens * r * h, tokens * outside, tokens * head_bytes
    )


def activation_bytes_per_gpu(
    config: LlamaConfig,
    micro_batch: int,
    seq_len: int,
    dtype_bytes: int,
    checkpointing: bool,
    *,
    residual_bytes: int | None = None,
    autocast: bool = False,
    head: str = "lm",
) -> int:
    """Activation bytes of one model's training step on one GPU (``activation_breakdown``).

    ``dtype_bytes``: compute dtype; ``residual_bytes`` defaults to it (4 under DDP autocast);
    ``checkpointing``: each transformer block recomputed in backward.
    """
    num = Numerics(dtype_bytes, residual_bytes or dtype_bytes, autocast)
    acts = activation_breakdown(config, micro_batch, seq_len, num, head)
    return acts.checkpointed if checkpointing else acts.full


def kv_cache_bytes(config: LlamaConfig, batch: int, total_len: int, dtype_bytes: int = 2) -> int:
    """KV cache of a rollout: ``batch`` sequences of ``total_len`` (prompt + response) tokens."""
    return batch * total_len * config.kv_cache_bytes_per_token(dtype_bytes)


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
    notes: list[str] = field(default_factory=list)

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


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:.2f}"


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
        "",
        f"  {'role':<15} {'head':<6} {'trained':<7} {'parameters':>17} {'GPU GiB':>8} "
        f"{'CPU GiB/node':>12}  loads",
    ]
    for row in plan.models:
        lines.append(
            f"  {row.role:<15} {row.head:<6} {'yes' if row.trainable else 'no':<7} "
            f"{row.n_params:>17,} {_gib(row.gpu_bytes):>8} {_gib(row.cpu_bytes):>12}  "
            f"{row.input or '(random init)'}"
        )
    lines += [
        f"  {'all models':<30} {plan.total_params:>17,} {_gib(plan.model_state_bytes):>8}",
        "",
        f"  model states per GPU      {_gib(plan.model_state_bytes):>8} GiB",
        f"  activations (train)       {_gib(plan.activation_bytes_checkpointed):>8} GiB with "
        f"checkpointing, {_gib(plan.activation_bytes_full)} GiB without (using: {ckpt})",
        f"  KV cache (rollout)        {_gib(plan.kv_cache_bytes):>8} GiB",
        "  on top of model states    "
        + ", ".join(f"{k} {_gib(v)} GiB" for k, v in plan.phase_bytes.items()),
        f"  peak per GPU              {_gib(plan.total_bytes_per_gpu):>8} GiB of "
        f"{plan.gpu_memory_gb:.2f} GiB ({plan.peak_phase} phase)",
        f"  verdict: {'FITS' if plan.fits else 'DOES NOT FIT'}: {plan.reason}",
    ]
    if plan.notes:
        lines += ["  notes:"] + [f"   - {note}" for note in plan.notes]
    return lines


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
) -> Plan:
    """The memory plan of a run, from numbers alone (no model is built, nothing is allocated).

    ``devices``: GPUs per node; ``micro_batch``: sequences per GPU per step (pairs for the
    reward stage, whose batch holds chosen and rejected rows); ``rollout_batch`` /
    ``rollout_len``: sequences generated at once per GPU and their prompt + response length
    (default: ``micro_batch`` and ``seq_len``; PPO and rejection sampling only).
    """
    _check_strategy(strategy)
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
    train_rows = 2 * micro_batch if stage == "reward" else micro_batch
    phases, figures = _phase_bytes(
        config, specs, num, train_rows, seq_len, activation_checkpointing,
        (rollout_batch, rollout_len) if generates else None,
    )  # fmt: skip
    states = sum(row.gpu_bytes for row in rows)
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
        notes=_notes(config, strategy, precision, stage, seq_len),
    )
    plan.reason = _reason(plan, config, specs)
    return plan


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
        f"{_gib(plan.model_state_bytes)} GiB model states + {_gib(extra)} GiB "
        f"{plan.peak_phase}-phase activations/cache"
    )
    if plan.fits:
        spare = (budget - plan.total_bytes_per_gpu) / GIB
        return f"{_gib(plan.total_bytes_per_gpu)} GiB per GPU ({split}), {spare:.2f} GiB spare"
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
            f"{_gib(plan.activation_bytes_checkpointed)} GiB"
        )
    if plan.micro_batch > 1 and plan.peak_phase == "train":
        hints.append("a smaller micro-batch cuts activations in proportion")
    return (
        f"needs {_gib(plan.total_bytes_per_gpu)} GiB per GPU ({split}) but the GPU has "
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

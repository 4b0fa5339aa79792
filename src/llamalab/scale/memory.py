"""Memory formulas: bytes per GPU of one model's states, activations and KV cache (no model built).

Plain integer arithmetic from a :class:`LlamaConfig` and the run's settings; no torch, no model.
:mod:`llamalab.scale.plan` adds these up over the models of a stage into the plan ``dry_run``
prints.

Units: bytes are exact integers. ``GIB`` is 2**30 bytes: an "80GB" A100/H100 has 80 GiB = 81,920
MiB. DeepSpeed's own tables also print GiB as "GB".

- model states: weights, gradients and optimizer states (AdamW), per strategy (see
  ``model_state_bytes``); ZeRO figures mirror DeepSpeed's estimators exactly (tests compare them);
  frozen models (reference, reward models) cost their weights only (``frozen_weight_bytes``).
- activations: what autograd keeps for backward, tensor by tensor (``activation_breakdown``),
  with and without activation checkpointing, and the no-grad forward of a rollout or a score.
- KV cache of a rollout (``kv_cache_bytes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from llamalab.model.config import LlamaConfig

GIB = 2**30
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


class PlanError(ValueError):
    """A run that cannot fit (the message holds the rendered plan), or impossible plan inputs."""


def normalize_precision(precision: str | int) -> str:
    """Lightning's precision setting (``"bf16-mixed"``, ``"bf16"``, ``32`` ...) -> canonical."""
    key = str(precision)
    if key not in _PRECISION_ALIASES:
        raise PlanError(
            f"unsupported precision {precision!r}; choose one of {sorted(_PRECISION_ALIASES)}"
        )
    return _PRECISION_ALIASES[key]


def check_strategy(strategy: str) -> None:
    """Raise :class:`PlanError` unless ``strategy`` is one of ``STRATEGIES``."""
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; choose one of {list(STRATEGIES)}")


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
    check_strategy(strategy)
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
    check_strategy(strategy)
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


def checkpoint_bytes_per_param(strategy: str, precision: str) -> int:
    """Bytes one trained parameter takes in a training checkpoint (frozen models are not saved):
    AdamW's two moments and the weights as the optimizer holds them: fp32 (8 + 4 = 12), or with
    16-bit-true weights and states under DDP / FSDP 2 + 4 = 6; ZeRO keeps fp32 master weights in
    its partitions, and ZeRO-2 adds the module's weights in the compute dtype."""
    check_strategy(strategy)
    if strategy.startswith("deepspeed"):
        return 12 + (compute_bytes(precision) if strategy == "deepspeed_zero2" else 0)
    return 6 if normalize_precision(precision).endswith("16-true") else 12

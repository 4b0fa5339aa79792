"""The generation section of the plan: which rollout engine, its memory per GPU, its speed.

Plain integer arithmetic (no torch), like the rest of the plan. For each engine
(:mod:`llamalab.scale.rollout_engine`) and a PPO rollout of ``prompts_per_gpu`` prompts per GPU,
``rollout_len`` tokens each (prompt + response), generated ``generation_batch`` prompts per
``generate`` call:

- weights per GPU of the inference copy: ``gather`` the whole actor in the compute dtype;
  ``tensor_parallel`` one rank's slice (:func:`tp_copy_bytes`: blocks and head 1/N, embedding
  and norms whole; the figure the engine allocates, checked by the tests); ``layerwise`` none
  beyond the ZeRO-3 shards (the one gathered layer is already in the model states);
- KV cache per GPU: the rows of one call times their length; under TP the group's prompts are
  generated together (``prompts_per_gpu x N`` rows) and each GPU holds its 1/N of the KV heads;
- seconds per generated token, one decode step of one call's rows, from the bytes each engine
  moves per step over the link that carries them (:data:`BANDWIDTHS`): ``gather`` reads the whole
  weights and its cache from HBM; ``tensor_parallel`` reads its slice and cache from HBM, then
  sends two all-reduces per block of the ``(rows, dim)`` hidden states and one all-gather of the
  ``(rows, vocab)`` float32 logits over NVLink, each collective paying a latency; ``layerwise``
  receives every other rank's shard of every layer, ``(world - 1) / world`` of the weights, over
  InfiniBand when the run spans nodes (NVLink otherwise). Compute is left out: decoding a few
  dozen rows is bound by these transfers.

``auto`` (:func:`pick_engine`): ``gather`` when the whole copy takes at most half the memory left
beside the model states, else ``tensor_parallel`` when its slice does, else ``layerwise``. The
runtime applies the same rule to the memory it finds free on the device.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from llamalab.model.config import LlamaConfig
from llamalab.scale.memory import Numerics, PlanError, activation_breakdown

ENGINES = ("auto", "gather", "layerwise", "tensor_parallel")
OLD_SPELLING = {"auto": "auto", "always": "gather", "never": "layerwise"}


def resolve_engine(engine: str, gather_for_generation: str | None = None) -> str:
    """The engine from ``rollout_engine``, or from the old ``gather_for_generation`` when set
    (with a deprecation warning); a clear error for an unknown name."""
    if gather_for_generation is not None:
        if gather_for_generation not in OLD_SPELLING:
            raise ValueError(
                f"stage.gather_for_generation must be one of {tuple(OLD_SPELLING)}, got "
                f"{gather_for_generation!r} (it is the old spelling of stage.rollout_engine)"
            )
        new = OLD_SPELLING[gather_for_generation]
        warnings.warn(
            f"stage.gather_for_generation={gather_for_generation} is deprecated: use "
            f"stage.rollout_engine={new}",
            DeprecationWarning,
            stacklevel=2,
        )
        if engine == "auto":
            engine = new
    if engine not in ENGINES:
        raise ValueError(f"stage.rollout_engine must be one of {ENGINES}, got {engine!r}")
    return engine


COPY_FRACTION = 0.5  # a copy is taken only when it needs at most this share of the free memory

# Bytes per second per GPU (one direction), and one small collective's latency. Sources:
# NVIDIA A100 80GB SXM datasheet (HBM2e 2,039 GB/s; NVLink 3: 600 GB/s per GPU both ways
# together); one 200 Gb/s HDR InfiniBand adapter per GPU, the layout of Meta's Research
# SuperCluster and of DGX A100 (8 x 200 Gb/s per node); about 20 us for an NCCL all-reduce of a
# few hundred KB inside a node (nccl-tests, small messages are latency-bound).
BANDWIDTHS = {
    "hbm_bytes_per_s": 2.0e12,
    "nvlink_bytes_per_s": 300e9,
    "infiniband_bytes_per_s": 25e9,
    "collective_latency_s": 20e-6,
}


def tp_copy_bytes(config: LlamaConfig, tp: int, dtype_bytes: int) -> int:
    """Bytes of one rank's tensor-parallel copy (:mod:`llamalab.scale.tensor_parallel`)."""
    d, hd = config.dim, config.head_dim
    block = (
        d * (config.n_heads // tp) * hd * 2  # wq, wo
        + d * (config.kv_heads // tp) * hd * 2  # wk, wv
        + 3 * d * (config.hidden_dim // tp)  # w1, w2, w3
        + 2 * d  # the two norms
    )
    head = config.vocab_size * d // (tp if config.vocab_size % tp == 0 else 1)
    return (config.vocab_size * d + config.n_layers * block + d + head) * dtype_bytes


def tp_divides(config: LlamaConfig, tp: int, world: int) -> bool:
    """Whether heads, KV heads, the FFN width and the world all divide by ``tp``."""
    return tp >= 1 and not (
        config.n_heads % tp or config.kv_heads % tp or config.hidden_dim % tp or world % tp
    )


def pick_engine(whole_bytes: int, tp_bytes: int | None, free_bytes: int) -> str:
    """``auto``'s choice: gather if the whole copy fits comfortably, else TP, else layerwise."""
    if whole_bytes <= COPY_FRACTION * free_bytes:
        return "gather"
    if tp_bytes is not None and tp_bytes <= COPY_FRACTION * free_bytes:
        return "tensor_parallel"
    return "layerwise"


@dataclass
class EngineCost:
    weights_bytes_per_gpu: int
    kv_cache_bytes_per_gpu: int
    rows_per_call: int  # sequences one generate call decodes at once on this GPU's group
    network_bytes_per_token: int  # bytes received per GPU per decode step
    seconds_per_token: float


def engine_cost(
    engine: str,
    config: LlamaConfig,
    compute_bytes: int,
    tp: int,
    world: int,
    num_nodes: int,
    prompts_per_gpu: int,
    generation_batch: int,
    rollout_len: int,
) -> EngineCost:
    """Memory and speed of one engine (see the module docstring for the model)."""
    bw = BANDWIDTHS
    whole = config.num_params("lm") * compute_bytes
    kv_token = config.kv_cache_bytes_per_token(compute_bytes)
    if engine == "tensor_parallel":
        rows = min(generation_batch, prompts_per_gpu * tp)
        weights = tp_copy_bytes(config, tp, compute_bytes)
        kv = rows * rollout_len * kv_token // tp
        ring = 2 * (tp - 1) / tp  # all-reduce: each GPU sends and receives this share, twice
        hidden = rows * config.dim * compute_bytes
        logits = rows * config.vocab_size * 4
        net = int(2 * config.n_layers * ring * hidden + (tp - 1) / tp * logits) if tp > 1 else 0
        collectives = (2 * config.n_layers + 1) if tp > 1 else 0
        seconds = (
            (weights + kv) / bw["hbm_bytes_per_s"]
            + net / bw["nvlink_bytes_per_s"]
            + collectives * bw["collective_latency_s"]
        )
        return EngineCost(weights, kv, rows, net, seconds)
    rows = min(generation_batch, prompts_per_gpu)
    kv = rows * rollout_len * kv_token
    if engine == "gather":
        return EngineCost(whole, kv, rows, 0, (whole + kv) / bw["hbm_bytes_per_s"])
    link = bw["infiniband_bytes_per_s"] if num_nodes > 1 else bw["nvlink_bytes_per_s"]
    net = whole * (world - 1) // world
    seconds = net / link + (whole // world + kv) / bw["hbm_bytes_per_s"]
    seconds += config.n_layers * bw["collective_latency_s"] if world > 1 else 0
    return EngineCost(0, kv, rows, net, seconds)


def generation_plan(
    config: LlamaConfig,
    compute_bytes: int,
    devices: int,
    num_nodes: int,
    engine: str,
    tp_size: int | None,
    prompts_per_gpu: int,
    generation_batch: int,
    rollout_len: int,
    free_bytes: int,
) -> dict[str, Any]:
    """The generation section of ``plan.json`` (``free_bytes``: the GPU's memory left beside
    the model states, which ``auto`` and the verdict weigh the copy against)."""
    if engine not in ENGINES:
        raise PlanError(f"stage.rollout_engine must be one of {ENGINES}, got {engine!r}")
    world = devices * num_nodes
    tp = int(tp_size or devices)
    divides = tp_divides(config, tp, world)
    costs = {
        name: engine_cost(
            name,
            config,
            compute_bytes,
            tp,
            world,
            num_nodes,
            prompts_per_gpu,
            generation_batch,
            rollout_len,
        )
        for name in ENGINES[1:]
        if name != "tensor_parallel" or divides
    }
    whole = costs["gather"].weights_bytes_per_gpu
    split = costs["tensor_parallel"].weights_bytes_per_gpu if divides else None
    chosen = pick_engine(whole, split, free_bytes) if engine == "auto" else engine
    if chosen not in costs:
        raise PlanError(
            f"stage.rollout_tp_size={tp} cannot split this model on {world} GPUs (heads "
            f"{config.n_heads}, KV heads {config.kv_heads}, FFN {config.hidden_dim} must divide)"
        )
    cost = costs[chosen]
    fitting = [
        name
        for name in ("gather", "tensor_parallel", "layerwise")
        if name in costs
        and costs[name].weights_bytes_per_gpu + costs[name].kv_cache_bytes_per_gpu <= free_bytes
    ]
    return {
        "engine": chosen,
        "requested": engine,
        "tp_size": tp if chosen == "tensor_parallel" else 1,
        "weights_bytes_per_gpu": cost.weights_bytes_per_gpu,
        "kv_cache_bytes_per_gpu": cost.kv_cache_bytes_per_gpu,
        "rows_per_call": cost.rows_per_call,
        "seconds_per_token": {k: c.seconds_per_token for k, c in costs.items()},
        "network_bytes_per_token": {k: c.network_bytes_per_token for k, c in costs.items()},
        "weights_bytes_by_engine": {k: c.weights_bytes_per_gpu for k, c in costs.items()},
        "kv_cache_bytes_by_engine": {k: c.kv_cache_bytes_per_gpu for k, c in costs.items()},
        "engines_that_fit": fitting,
        "tp_size_possible": tp,
        "bandwidths": dict(BANDWIDTHS),
    }


def rollout_phase(
    config: LlamaConfig,
    num: Numerics,
    devices: int,
    num_nodes: int,
    engine: str,
    tp_size: int | None,
    rows_per_gpu: int,
    generation_batch: int,
    rollout_len: int,
    prompt_len: int | None,
    free_bytes: int,
) -> tuple[dict[str, Any], int]:
    """The generation section and the rollout phase's bytes on top of the model states (PPO and
    rejection sampling): the engine's inference copy, its KV cache and one forward of a call's
    rows over the longest prompt (the prefill). ``rows_per_gpu``: the rows one rank hands the
    engine at once (PPO: its prompts; rejection sampling: a chunk's prompts x K)."""
    gen = generation_plan(
        config, num.compute_bytes, devices, num_nodes, engine, tp_size, rows_per_gpu,
        generation_batch, rollout_len, free_bytes,
    )  # fmt: skip
    prefill = min(prompt_len or rollout_len, rollout_len)
    forward = activation_breakdown(config, gen["rows_per_call"], prefill, num)
    return gen, gen["weights_bytes_per_gpu"] + gen["kv_cache_bytes_per_gpu"] + forward.inference


def engine_settings(
    engine: str, tp_size: int | None, gather_for_generation: str | None = None
) -> tuple[str, int | None]:
    """``stage.rollout_engine`` (or its old spelling) and ``stage.rollout_tp_size``, checked:
    the settings of every stage that generates with a rollout engine."""
    if tp_size is not None and tp_size < 1:
        raise ValueError(f"stage.rollout_tp_size must be >= 1, got {tp_size}")
    return resolve_engine(engine, gather_for_generation), tp_size


def render_generation(gen: dict[str, Any], gib: float) -> list[str]:
    """The plan table's generation lines."""
    per_token = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in gen["seconds_per_token"].items())
    bw = gen["bandwidths"]
    return [
        f"  generation engine         {gen['engine']} (asked: {gen['requested']}), TP "
        f"{gen['tp_size']}, {gen['rows_per_call']} rows per generate call",
        f"  inference copy per GPU    {gen['weights_bytes_per_gpu'] / gib:>8.2f} GiB, KV cache "
        f"{gen['kv_cache_bytes_per_gpu'] / gib:.2f} GiB",
        f"  seconds per token (est.)  {per_token}",
        f"    (HBM {bw['hbm_bytes_per_s'] / 1e12:.1f} TB/s, NVLink "
        f"{bw['nvlink_bytes_per_s'] / 1e9:.0f} GB/s, InfiniBand "
        f"{bw['infiniband_bytes_per_s'] / 1e9:.0f} GB/s per GPU, "
        f"{bw['collective_latency_s'] * 1e6:.0f} us per collective)",
        f"  engines that fit          {', '.join(gen['engines_that_fit']) or 'none'}",
    ]


def engine_advice(gen: dict[str, Any]) -> str:
    """Why the chosen engine does not fit, naming the one that does (empty when it fits)."""
    if gen["engine"] in gen["engines_that_fit"]:
        return ""
    fitting = [e for e in gen["engines_that_fit"] if e != gen["engine"]]
    need = gen["weights_bytes_per_gpu"] + gen["kv_cache_bytes_per_gpu"]
    advice = (
        f"stage.rollout_engine={gen['engine']} needs {need / 2**30:.2f} GiB per GPU for its "
        "inference copy and KV cache beside the model states"
    )
    if fitting:
        best = fitting[0]
        cost = gen["weights_bytes_by_engine"][best] + gen["kv_cache_bytes_by_engine"][best]
        tp = (
            f" stage.rollout_tp_size={gen['tp_size_possible']}" if best == "tensor_parallel" else ""
        )
        advice += (
            f"; the engine that fits: stage.rollout_engine={best}{tp} ({cost / 2**30:.2f} GiB)"
        )
    return advice


def check_engine(gen: dict[str, Any] | None) -> None:
    """Stop a launch whose rollout engine cannot fit, naming the engine that does."""
    if gen is not None and gen["engine"] not in gen["engines_that_fit"]:
        raise PlanError(engine_advice(gen))

"""The batch rule every stage follows: config batch sizes are global, micro-batches are per GPU.

As in the paper (PAPER.md), a stage's batch is counted over the whole run: SFT's 64 sequences,
the reward models' 512 pairs, pretraining's 4M tokens per optimizer step, PPO's 512 prompts per
iteration and 64 rows per mini-batch (one optimizer step). The stage divides them over the
data-parallel ranks; the micro-batch (``data.batch_size``; PPO: ``stage.micro_batch``) is what
one GPU runs in one forward/backward, and gradient accumulation makes up the rest:

    global batch = world size x micro-batch x micro-batches per step (per rank)

A value that does not divide stops the run before any model is built, naming the keys: a global
batch that is not a multiple of the world size, a per-rank batch that is not a multiple of the
micro-batch, a PPO rollout that is not a whole number of mini-batches. ``trainer.
accumulate_grad_batches`` set by hand overrides the rule (the global batch is then what it
makes). The runner (:mod:`llamalab.runner.run`), the PPO stage and the memory planner
(:mod:`llamalab.scale.plan_cfg`) all read the per-rank figures from :func:`batch_layout`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from llamalab.model.config import ConfigError

# Stages whose batch is reached by Lightning's gradient accumulation over ``data.batch_size``
# micro-batches, and the stage key that holds the global batch.
ITEM_STAGES = {
    "sft": "sequences",
    "rejection_sampling": "sequences",
    "reward": "pairs",
    "dpo": "pairs",
}


@dataclass(frozen=True)
class BatchLayout:
    """Per-rank figures of one optimizer step (PPO: of one iteration and its mini-batches).

    ``unit``: what a row counts (sequences, pairs, prompts); ``global_batch``: rows per
    optimizer step over all ranks (PPO: prompts per iteration); ``per_rank``: this rank's share;
    ``micro_batch``: rows per GPU per forward/backward; ``accumulation``: micro-batches per
    optimizer step on each rank (PPO: per mini-batch). PPO only: ``mini_batch`` (global rows per
    optimizer step), ``mini_per_rank``, ``mini_batches`` (optimizer steps per PPO epoch) and
    ``generation_rows``: rows per GPU in one ``generate()`` call and in one no-grad forward of
    the scoring and reading passes (the rank's prompts, at most ``stage.generation_batch``).
    """

    stage: str
    unit: str
    world: int
    global_batch: int
    per_rank: int
    micro_batch: int
    accumulation: int
    mini_batch: int = 0
    mini_per_rank: int = 0
    mini_batches: int = 0
    generation_rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive(**values: Any) -> None:
    bad = [f"{k}={v!r}" for k, v in values.items() if isinstance(v, bool) or not _is_pos(v)]
    if bad:
        raise ConfigError("batch sizes must be positive integers: " + ", ".join(bad))


def _is_pos(value: Any) -> bool:
    return isinstance(value, int) and value > 0


def _divide(total: int, parts: int, what: str, by: str) -> int:
    """``total / parts`` when it divides, else a ConfigError naming both settings."""
    if total % parts:
        raise ConfigError(
            f"{what} ({total}) does not divide by {by} ({parts}): batch sizes are global and "
            "every rank must run the same whole number of rows (README, Scale); change one"
        )
    return total // parts


def ppo_layout(
    rollout_batch: int,
    mini_batch: int,
    micro_batch: int | None,
    world: int,
    generation_batch: int = 64,
) -> BatchLayout:
    """PPO: ``rollout_batch`` prompts per iteration and ``mini_batch`` rows per optimizer step,
    both global; ``micro_batch`` rows per GPU per forward/backward (None: the rank's whole
    mini-batch); ``generation_batch`` the most rows per GPU in one generate() call."""
    _positive(**{"stage.rollout_batch": rollout_batch, "stage.mini_batch": mini_batch})
    _positive(**{"stage.generation_batch": generation_batch})
    if micro_batch is not None:
        _positive(**{"stage.micro_batch": micro_batch})
    mini_batches = _divide(rollout_batch, mini_batch, "stage.rollout_batch", "stage.mini_batch")
    per_rank = _divide(rollout_batch, world, "stage.rollout_batch", "the world size")
    mini_rank = _divide(mini_batch, world, "stage.mini_batch", "the world size")
    micro = mini_rank if micro_batch is None else micro_batch
    accumulation = _divide(
        mini_rank, micro, f"stage.mini_batch per rank ({mini_batch} / {world})", "stage.micro_batch"
    )
    return BatchLayout(
        "ppo", "prompts", world, rollout_batch, per_rank, micro, accumulation,
        mini_batch, mini_rank, mini_batches, min(per_rank, generation_batch),
    )  # fmt: skip


def batch_layout(cfg: Any, world: int) -> BatchLayout | None:
    """The layout of a composed config on ``world`` ranks; None for a stage without a batch
    rule (or with ``trainer.accumulate_grad_batches`` set by hand). Raises ConfigError."""
    stage, data = cfg.stage, cfg.data
    if stage.name == "ppo":
        return ppo_layout(
            stage.rollout_batch,
            stage.mini_batch,
            stage.get("micro_batch"),
            int(world),
            stage.get("generation_batch", 64),
        )
    if cfg.trainer.get("accumulate_grad_batches"):
        return None
    micro = data.get("batch_size")
    if stage.get("batch_tokens"):
        seq_len = data.get("seq_len")
        _positive(**{"stage.batch_tokens": stage.batch_tokens, "data.seq_len": seq_len})
        _positive(**{"data.batch_size": micro})
        rows = _divide(stage.batch_tokens, seq_len, "stage.batch_tokens", "data.seq_len")
        what = f"stage.batch_tokens / data.seq_len ({rows} sequences)"
        return _items("sequences", stage.name, rows, micro, world, what)
    if stage.name in ITEM_STAGES and stage.get("batch_size"):
        _positive(**{"stage.batch_size": stage.batch_size, "data.batch_size": micro})
        return _items(ITEM_STAGES[stage.name], stage.name, stage.batch_size, micro, world)
    return None


def _items(
    unit: str, stage: str, rows: int, micro: int, world: int, what: str = "stage.batch_size"
) -> BatchLayout:
    per_rank = _divide(rows, world, what, "the world size")
    accumulation = _divide(
        per_rank, micro, f"{what} per rank ({rows} / {world})", "data.batch_size (the micro-batch)"
    )
    return BatchLayout(stage, unit, world, rows, per_rank, micro, accumulation)


def batch_section(
    layout: dict[str, Any] | None,
    stage: str,
    micro_batch: int,
    seq_len: int,
    rollout_batch: int,
    rollout_len: int,
) -> dict[str, Any]:
    """``plan.json``'s ``batch``: the global batch, each GPU's share, and the rows and tokens
    per row that each phase runs at once on one GPU (the figures the phases' bytes are made of).
    ``prompts_per_gpu``: PPO's prompts per GPU per iteration (None for other stages)."""
    generates = stage in ("ppo", "rejection_sampling")
    rows = 2 * micro_batch if ITEM_STAGES.get(stage) == "pairs" else micro_batch
    out: dict[str, Any] = dict(layout or {})
    out.update(
        prompts_per_gpu=out.get("per_rank") if stage == "ppo" else None,
        rows_per_micro_batch=rows,
        tokens_per_row=seq_len,
        rows_per_generation_call=rollout_batch if generates else 0,
        rows_per_score_forward=rollout_batch if generates else 0,
        tokens_per_rollout_row=rollout_len if generates else 0,
    )
    return out

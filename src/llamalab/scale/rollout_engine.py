"""Which engine samples the rollouts of a sharded actor, and the tensor-parallel one's lifetime.

``stage.rollout_engine`` (PPO and rejection sampling):

- ``gather``: a whole copy of the actor on every rank, gathered one unit at a time, then local
  generation with no communication (:func:`llamalab.scale.zero_gen.consolidated`). Fastest
  while a whole copy fits comfortably (up to about 13B on 80 GB GPUs).
- ``layerwise``: the sharded model itself, every layer gathered on every forward, ranks in
  lockstep (:class:`llamalab.scale.zero_gen.LockstepModel`). Needs no extra memory; moves the
  whole model over the network per generated token.
- ``tensor_parallel``: each group of ``stage.rollout_tp_size`` ranks (default: the GPUs of one
  node) holds one copy split 1/N per rank (:mod:`llamalab.scale.tensor_parallel`). The prompts
  of the group's ranks are shared inside it (each rank keeps its own data-parallel prompts),
  generated together with the group leader's seed, and each rank takes back its own rows. The
  copy is kept while the weights do not change (the ``version``, the optimizer step count) and
  freed after each rollout unless the caller keeps it.
- ``auto``: :func:`llamalab.scale.plan_gen.pick_engine` with this rank's free memory, the rule
  the plan applies to the GPU's (all ranks agree: the minimum is taken).

``stage.gather_for_generation`` (auto | always | never) is the old spelling: ``always`` means
``gather``, ``never`` ``layerwise`` and ``auto`` ``auto``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llamalab.generation import GenerationOutput, sample_responses
from llamalab.scale.build import sharding_mode
from llamalab.scale.plan_gen import ENGINES, pick_engine, resolve_engine, tp_copy_bytes
from llamalab.scale.tensor_parallel import (
    TPLlama,
    build_tp_copy,
    check_tp,
    resident_bytes,
    tp_groups,
)
from llamalab.scale.zero_gen import (
    _all_reduce,
    free_memory_bytes,
    full_bytes,
    generation_model,
    settle_zero3,
)

log = logging.getLogger("llamalab")
__all__ = ["ENGINES", "RolloutEngine", "generation_how", "resolve_engine", "stage_rollout"]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RolloutEngine:
    """Samples rollouts with the configured engine; holds the TP groups and the TP copy."""

    def __init__(self, engine: str = "auto", tp_size: int | None = None) -> None:
        self.engine = resolve_engine(engine)
        self.tp_size = tp_size
        self.copy: TPLlama | None = None
        self.version: int | None = None
        self.builds = 0  # how many times the TP copy was built (tests, logs)
        self._groups: dict[int, Any] = {}

    # ------------------------------------------------------------------ choosing
    def tp(self, devices_per_node: int) -> int:
        return int(self.tp_size or devices_per_node or 1)

    def choose(self, model: nn.Module, mode: str, devices_per_node: int) -> str:
        """The engine to run now (``auto`` resolved, the same on every rank)."""
        if self.engine != "auto":
            return self.engine
        if mode == "none":
            return "gather"  # the model is whole already: generate with it
        tp = self.tp(devices_per_node)
        free = free_memory_bytes()
        if dist.is_initialized():
            free = _all_reduce(free, dist.ReduceOp.MIN)
        whole = full_bytes(model)
        dtype_bytes = next(model.parameters()).element_size()
        try:
            check_tp(model.config, tp, _world()[1])  # type: ignore[arg-type]
            split = tp_copy_bytes(model.config, tp, dtype_bytes)  # type: ignore[arg-type]
        except ValueError:
            split = None
        return pick_engine(whole, split, free)

    def group(self, tp: int) -> Any:
        """This rank's TP process group (created once, collectively; None at TP 1)."""
        rank, world = _world()
        if world % tp:
            raise ValueError(f"stage.rollout_tp_size={tp} does not divide the world size {world}")
        if tp == 1:
            return None
        if tp not in self._groups:
            mine = None
            for ranks in tp_groups(world, tp):
                g = dist.new_group(list(ranks))  # every rank creates every group
                if rank in ranks:
                    mine = g
            self._groups[tp] = mine
        return self._groups[tp]

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        model: nn.Module,
        strategy: Any,
        prompts: list[list[int]],
        *,
        seed_of: Callable[[int], int],
        version: int,
        devices_per_node: int = 1,
        keep: bool = False,
        mode: str | None = None,
        chosen: str | None = None,
        **kwargs: Any,
    ) -> GenerationOutput:
        """One response per prompt of this rank; ``seed_of(rank)`` seeds the rank's rows
        (the group leader's seed under TP). Every rank must call it. ``mode`` (``zero3`` |
        ``fsdp`` | ``none``) is read from the Lightning ``strategy``; a model sharded outside
        Lightning (``strategy=None``) passes it to build the ``tensor_parallel`` copy from its
        shards (the other engines need the strategy). ``chosen``: the engine to run, chosen
        once by a caller that samples in several calls (default: :meth:`choose` now)."""
        if mode is None:
            mode = sharding_mode(strategy) if strategy is not None else "none"
        rank, _ = _world()
        engine = chosen or self.choose(model, mode, devices_per_node)
        if engine != "tensor_parallel":
            self.release()
            how = "always" if engine == "gather" else "never"
            context = (
                generation_model(model, strategy, how)
                if mode != "none"
                else contextlib.nullcontext(model)
            )
            with context as m:
                return sample_responses(m, prompts, seed=seed_of(rank), **kwargs)
        tp = self.tp(devices_per_node)
        group = self.group(tp)
        copy = self.tp_copy(model, strategy, mode, tp, group, version)
        try:
            return self._sample_tp(copy, group, tp, prompts, seed_of, **kwargs)
        finally:
            if not keep:
                self.release()

    def tp_copy(
        self, model: nn.Module, strategy: Any, mode: str, tp: int, group: Any, version: int
    ) -> TPLlama:
        """The cached copy if the weights are unchanged (same ``version``), else a new one."""
        if self.copy is not None and self.version == version and self.copy.tp_size == tp:
            return self.copy
        self.release()
        if mode == "zero3" and strategy is not None:
            settle_zero3(strategy)
        rank, _ = _world()
        device = next(model.parameters()).device
        self.copy = build_tp_copy(model, mode, tp, rank % tp, group, device=device)  # type: ignore[arg-type]
        self.version, self.builds = version, self.builds + 1
        if rank == 0 and self.builds == 1:
            log.info(
                "rollout engine tensor_parallel: TP %d, %.1f MiB of weights per rank",
                tp,
                resident_bytes(self.copy) / 2**20,
            )
        return self.copy

    def _sample_tp(
        self,
        copy: TPLlama,
        group: Any,
        tp: int,
        prompts: list[list[int]],
        seed_of: Callable[[int], int],
        **kwargs: Any,
    ) -> GenerationOutput:
        rank, _ = _world()
        leader = rank - rank % tp
        shared: list[list[list[int]]] = [prompts]
        if group is not None:  # every rank of the group generates for all the group's prompts
            shared = [[] for _ in range(tp)]
            dist.all_gather_object(shared, [list(p) for p in prompts], group=group)
        rows = [p for member in shared for p in member]
        out = sample_responses(copy, rows, seed=seed_of(leader), **kwargs)
        start = sum(len(member) for member in shared[: rank % tp]) if group is not None else 0
        mine = slice(start, start + len(prompts))
        return GenerationOutput(out.tokens[mine], out.logprobs[mine], out.finished[mine])

    def release(self) -> None:
        """Free the TP copy (the next rollout rebuilds it)."""
        self.copy, self.version = None, None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def generation_how(engine: str) -> str:
    """:func:`llamalab.scale.zero_gen.generation_model`'s ``how`` for an engine that is not the
    TP one (held-out evaluation): a whole copy under ``gather``, per layer under ``layerwise``,
    else by free memory."""
    return {"gather": "always", "layerwise": "never"}.get(engine, "auto")


def stage_rollout(
    engine: RolloutEngine,
    stage: Any,
    model: nn.Module,
    prompts: list[list[int]],
    *,
    seed_of: Callable[[int], int],
    **kwargs: Any,
) -> GenerationOutput:
    """A Lightning stage's rollout with ``engine``: the strategy (sharded or not), the GPUs per
    node and the weights' version (the optimizer steps taken) read from the stage's trainer."""
    trainer = stage._trainer
    strategy = trainer.strategy if trainer is not None and stage.sharded else None
    devices = int(trainer.num_devices) if trainer is not None else 1
    return engine.sample(
        model,
        strategy,
        prompts,
        seed_of=seed_of,
        version=int(stage.global_step),
        devices_per_node=devices,
        **kwargs,
    )
